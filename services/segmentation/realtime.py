"""What a profile change can affect, and when time alone can change a membership (pure domain logic).

Real time re-evaluates a person when the profile feed says something about them changed. Two facts
about a rule keep that cheap and exact:

- `dependencies_of(rule, rules)`: the trait names, event names and computed traits the rule (and the
  segments it refers to) reads. A change that names none of them cannot change the rule's value,
  except for a person seen for the first time, so rules that hold for an empty profile
  (`holds_for_nobody_in_particular`, e.g. `NOT segment("vip")`) are evaluated on every change.
- `next_change_time(rule, facts, as_of, rule_of)`: the earliest time after `as_of` at which the
  rule's value can change without any new data: an event leaving a `last N days` window, a future
  event entering one, `computed.recency_days` crossing a bound. The sweeper evaluates the person
  again then. It may name a time at which nothing changes (a candidate, not a promise); it never
  misses one, except for the lifecycle stage and RFM scores, whose thresholds belong to the profile
  service: rules on those are re-evaluated daily (`DAILY`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.segmentation.evaluation import ProfileFacts, RuleLookup, matches, passes
from services.segmentation.rules import (
    AllOf,
    AnyOf,
    EventAggregateCondition,
    EventCountCondition,
    LastDays,
    Not,
    Rule,
    ScoreCondition,
    SegmentCondition,
    TraitCondition,
    conditions,
    score_trait,
)

DAILY = timedelta(days=1)
# Computed traits that change as time passes (given the same events): recency in days is handled
# exactly; the stage and the RFM scores come from thresholds the profile service owns.
TIME_DEPENDENT_COMPUTED = frozenset({"lifecycle_stage", "rfm.recency_score", "rfm.segment"})


@dataclass(frozen=True)
class Dependencies:
    """What a rule reads: a change naming none of it cannot change the rule's value for a known person."""

    trait_names: frozenset[str]
    event_names: frozenset[str]
    # Computed traits derive from the whole timeline: any new event may change them.
    uses_computed: bool
    # The rule holds for a profile with no facts at all, so a new person may enter on any change.
    holds_for_nobody_in_particular: bool

    def affected_by(self, trait_names: Iterable[str], event_names: Iterable[str]) -> bool:
        events = set(event_names)
        return (self.holds_for_nobody_in_particular or bool(self.trait_names.intersection(trait_names))
                or bool(self.event_names & events) or (self.uses_computed and bool(events)))


def _reachable(rule: Rule, rules: Mapping[str, Rule]) -> list[Rule]:
    """The rule and every rule it refers to, transitively (references have no cycles)."""
    found, pending, seen = [], [rule], set()
    while pending:
        current = pending.pop()
        found.append(current)
        for condition in conditions(current):
            if isinstance(condition, SegmentCondition) and condition.segment_id not in seen:
                seen.add(condition.segment_id)
                if condition.segment_id in rules:
                    pending.append(rules[condition.segment_id])
    return found


def dependencies_of(rule: Rule, rules: Mapping[str, Rule], as_of: datetime) -> Dependencies:
    traits: set[str] = set()
    events: set[str] = set()
    uses_computed = False
    for reached in _reachable(rule, rules):
        for condition in conditions(reached):
            if isinstance(condition, TraitCondition):
                head, _, name = condition.field.partition(".")
                if head == "traits":
                    traits.add(name)
                else:
                    uses_computed = True
            elif isinstance(condition, ScoreCondition):
                traits.add(score_trait(condition.model, condition.score_field))
            elif isinstance(condition, EventCountCondition | EventAggregateCondition):
                events.add(condition.event_name)
    empty = ProfileFacts("", {}, {}, ())
    return Dependencies(frozenset(traits), frozenset(events), uses_computed,
                        matches(rule, empty, as_of, rules.get))


@dataclass(frozen=True)
class EventReads:
    """The events that evaluating some rules at `as_of` looks at: these names, at or after `since` (no window
    of them starts earlier, and an event before every window neither matches nor changes anything later)."""

    names: frozenset[str]
    since: datetime | None  # None when no rule reads events

    def wants(self, name: str, when: datetime) -> bool:
        return name in self.names and self.since is not None and when >= self.since


NO_EVENTS = EventReads(frozenset(), None)
# The profile service compared event times at millisecond precision once: a margin that costs nothing.
_SINCE_MARGIN = timedelta(milliseconds=1)


def events_read(rules: Iterable[Rule], all_rules: Mapping[str, Rule], as_of: datetime) -> EventReads:
    """The events any of `rules` (with their references) counts or aggregates at `as_of`."""
    names: set[str] = set()
    starts: list[datetime] = []
    for rule in rules:
        for reached in _reachable(rule, all_rules):
            for condition in conditions(reached):
                if isinstance(condition, EventCountCondition | EventAggregateCondition):
                    names.add(condition.event_name)
                    window = condition.window
                    starts.append(as_of - timedelta(days=window.days) if isinstance(window, LastDays)
                                  else window.start)
    if not names:
        return NO_EVENTS
    return EventReads(frozenset(names), min(starts) - _SINCE_MARGIN)


def next_change_time(rule: Rule, facts: ProfileFacts, as_of: datetime, rule_of: RuleLookup) -> datetime | None:
    """The earliest time after `as_of` at which the rule's value may change with no new data, if any (none when
    conditions that time cannot change decide it, e.g. `traits.plan = "pro" AND ...` for a person on another
    plan: a recompute then schedules only the persons whose membership time can still change)."""
    if _settled_value(rule, facts, as_of, rule_of) is not None:
        return None
    candidates: list[datetime] = []
    pending, seen = [rule], set()
    while pending:
        current = pending.pop()
        for condition in conditions(current):
            if isinstance(condition, SegmentCondition):
                other = rule_of(condition.segment_id)
                if other is not None and condition.segment_id not in seen:
                    seen.add(condition.segment_id)
                    pending.append(other)
            elif isinstance(condition, EventCountCondition | EventAggregateCondition):
                for event in facts.events:
                    if event.name != condition.event_name or not passes(event, condition.filters):
                        continue
                    if event.time > as_of:
                        candidates.append(event.time)  # enters its window when its time comes
                    elif isinstance(condition.window, LastDays):
                        candidates.append(event.time + timedelta(days=condition.window.days))  # leaves it
            elif isinstance(condition, TraitCondition) and condition.field.startswith("computed."):
                name = condition.field.removeprefix("computed.")
                if name in TIME_DEPENDENT_COMPUTED:
                    candidates.append(as_of + DAILY)
                elif name == "recency_days" and isinstance(facts.computed.get(name), int | float):
                    last_order = as_of - timedelta(days=float(facts.computed[name]))
                    candidates += [last_order + timedelta(days=float(bound))
                                   for bound in condition.comparison.operands if isinstance(bound, int | float)
                                   and not isinstance(bound, bool)]
    future = [when for when in candidates if when > as_of]
    return min(future) if future else None


def _settled_value(rule: Rule, facts: ProfileFacts, as_of: datetime, rule_of: RuleLookup) -> bool | None:
    """The rule's value at `as_of` when no passing of time can change it without new data (conditions on traits,
    scores and computed traits that do not move with time decide it); None when it may change."""
    if isinstance(rule, AllOf | AnyOf):
        deciding = isinstance(rule, AnyOf)  # the value of one child that decides the whole: true for OR
        values = [_settled_value(child, facts, as_of, rule_of) for child in rule.rules]
        if deciding in values:
            return deciding
        return None if None in values else not deciding
    if isinstance(rule, Not):
        value = _settled_value(rule.rule, facts, as_of, rule_of)
        return None if value is None else not value
    if isinstance(rule, SegmentCondition):
        other = rule_of(rule.segment_id)  # references have no cycles
        return False if other is None else _settled_value(other, facts, as_of, rule_of)
    if isinstance(rule, ScoreCondition) or (isinstance(rule, TraitCondition) and not _moves_with_time(rule.field)):
        return matches(rule, facts, as_of, rule_of)
    return None


def _moves_with_time(field: str) -> bool:
    head, _, name = field.partition(".")
    return head == "computed" and (name in TIME_DEPENDENT_COMPUTED or name == "recency_days")
