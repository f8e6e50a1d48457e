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

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.segmentation.evaluation import (
    ORDER_EVENT,
    ProfileFacts,
    RuleLookup,
    compile_rule,
    event_conditions,
    is_refund,
    matches,
    passes,
    reachable_rules,
    reported_cycle,
)
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


def dependencies_of(rule: Rule, rules: Mapping[str, Rule], as_of: datetime) -> Dependencies:
    traits: set[str] = set()
    events: set[str] = set()
    uses_computed = False
    for reached in reachable_rules(rule, rules.get):
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
    # Whether any rule filters or aggregates event properties: if none does, facts need no properties (their
    # conversion is most of what turning a scanned profile into facts costs).
    properties: bool = True

    def wants(self, name: str, when: datetime) -> bool:
        return name in self.names and self.since is not None and when >= self.since


NO_EVENTS = EventReads(frozenset(), None)
# The profile service compared event times at millisecond precision once: a margin that costs nothing.
_SINCE_MARGIN = timedelta(milliseconds=1)


@dataclass(frozen=True)
class ProfileReads:
    """What evaluating some rules reads of a profile besides its events: the traits named (None: every trait)
    and whether computed traits. Profile derives computed traits from every event of a person, so a scan
    that needs none of them reads only the events the rules count."""

    trait_names: frozenset[str] | None = None
    computed: bool = True


EVERY_FIELD = ProfileReads()


def profile_reads(rules: Iterable[Rule], all_rules: Mapping[str, Rule], as_of: datetime) -> ProfileReads:
    """The traits and computed traits any of `rules` (with the segments they refer to) reads."""
    read = [dependencies_of(rule, all_rules, as_of) for rule in rules]
    return ProfileReads(frozenset().union(*(d.trait_names for d in read)), any(d.uses_computed for d in read))


def events_read(rules: Iterable[Rule], all_rules: Mapping[str, Rule], as_of: datetime) -> EventReads:
    """The events any of `rules` (with their references) counts or aggregates at `as_of`."""
    names: set[str] = set()
    starts: list[datetime] = []
    properties = False
    for rule in rules:
        for condition in event_conditions(rule, all_rules.get):
            names.add(condition.event_name)
            # A count of orders reads `amount` too: refunds are not counted (evaluation.is_refund).
            properties |= (isinstance(condition, EventAggregateCondition) or bool(condition.filters)
                           or condition.event_name == ORDER_EVENT)
            window = condition.window
            starts.append(as_of - timedelta(days=window.days) if isinstance(window, LastDays) else window.start)
    if not names:
        return NO_EVENTS
    return EventReads(frozenset(names), min(starts) - _SINCE_MARGIN, properties)


ChangeTime = Callable[[ProfileFacts], datetime | None]


def next_change_time(rule: Rule, facts: ProfileFacts, as_of: datetime, rule_of: RuleLookup) -> datetime | None:
    """The earliest time after `as_of` at which the rule's value may change with no new data, if any (none when
    conditions that time cannot change decide it, e.g. `traits.plan = "pro" AND ...` for a person on another
    plan: a recompute then schedules only the persons whose membership time can still change)."""
    return compile_next_change(rule, as_of, rule_of)(facts)


def compile_next_change(rule: Rule, as_of: datetime, rule_of: RuleLookup) -> ChangeTime:
    """`next_change_time(rule, facts, as_of, rule_of)` as a function of the facts alone, the rule walked once (a
    recompute asks it for every profile). A rule that reaches a cycle of references matches nobody, whatever
    the time (evaluation.compile_rule)."""
    if reported_cycle(rule, rule_of) is not None:
        return lambda facts: None
    settled = compile_settled(rule, as_of, rule_of)
    sources: list[Callable[[ProfileFacts], Iterable[datetime]]] = []
    tomorrow = (as_of + DAILY,)
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
                sources.append(_window_passages(condition, as_of))
            elif isinstance(condition, TraitCondition) and condition.field.startswith("computed."):
                name = condition.field.removeprefix("computed.")
                if name in TIME_DEPENDENT_COMPUTED:
                    sources.append(lambda facts: tomorrow)
                elif name == "recency_days":
                    sources.append(_recency_crossings(condition, as_of))

    def next_change(facts: ProfileFacts) -> datetime | None:
        if settled(facts) is not None:
            return None
        future = [when for source in sources for when in source(facts) if when > as_of]
        return min(future) if future else None
    return next_change


def _window_passages(condition: EventCountCondition | EventAggregateCondition,
                     as_of: datetime) -> Callable[[ProfileFacts], Iterable[datetime]]:
    """When each event the condition counts enters its window (a future event, at its time) or leaves it (a
    `last N days` window, N days after)."""
    name, filters, window = condition.event_name, condition.filters, condition.window
    span = timedelta(days=window.days) if isinstance(window, LastDays) else None
    # A count of orders does not count refunds (evaluation.is_refund): their passages change nothing.
    purchases_only = isinstance(condition, EventCountCondition) and name == ORDER_EVENT

    def passages(facts: ProfileFacts) -> Iterator[datetime]:
        for event in facts.events:
            if (event.name != name or (filters and not passes(event, filters))
                    or (purchases_only and is_refund(event))):
                continue
            if event.time > as_of:
                yield event.time  # enters its window when its time comes
            elif span is not None:
                yield event.time + span  # leaves it
    return passages


def _recency_crossings(condition: TraitCondition, as_of: datetime) -> Callable[[ProfileFacts], Iterable[datetime]]:
    """When `computed.recency_days` reaches each of the condition's bounds (a bound or a recency beyond the
    datetime range, or not finite, is never reached: it names no time)."""
    bounds = [span for bound in condition.comparison.operands
              if isinstance(bound, int | float) and not isinstance(bound, bool)
              and (span := _days(bound)) is not None]

    def crossings(facts: ProfileFacts) -> list[datetime]:
        recency = facts.computed.get("recency_days")
        if not isinstance(recency, int | float) or isinstance(recency, bool) or (since := _days(recency)) is None:
            return []
        times = []
        for bound in bounds:
            try:
                times.append(as_of - since + bound)
            except OverflowError:  # before year 1 or after 9999
                continue
        return times
    return crossings


def _days(days: float) -> timedelta | None:
    """`days` as a timedelta; None when not finite or beyond timedelta's range (older data may hold such)."""
    try:
        return timedelta(days=float(days))
    except (OverflowError, ValueError):
        return None


def compile_settled(rule: Rule, as_of: datetime, rule_of: RuleLookup) -> Callable[[ProfileFacts], bool | None]:
    """The rule's value at `as_of` when no passing of time can change it without new data (conditions on traits,
    scores and computed traits that do not move with time decide it); None when it may change. It never looks
    at events, so it decides from facts read without them (a recompute's first phase) just as with them. The
    rule must reach no cycle of references (see compile_next_change)."""
    if isinstance(rule, AllOf | AnyOf):
        deciding = isinstance(rule, AnyOf)  # the value of one child that decides the whole: true for OR
        children = [compile_settled(child, as_of, rule_of) for child in rule.rules]

        def group(facts: ProfileFacts) -> bool | None:
            values = [child(facts) for child in children]
            if deciding in values:
                return deciding
            return None if None in values else not deciding
        return group
    if isinstance(rule, Not):
        negated = compile_settled(rule.rule, as_of, rule_of)

        def negation(facts: ProfileFacts) -> bool | None:
            value = negated(facts)
            return None if value is None else not value
        return negation
    if isinstance(rule, SegmentCondition):
        other = rule_of(rule.segment_id)  # no cycle: compile_next_change checked
        return (lambda facts: False) if other is None else compile_settled(other, as_of, rule_of)
    if isinstance(rule, ScoreCondition) or (isinstance(rule, TraitCondition) and not _moves_with_time(rule.field)):
        return compile_rule(rule, as_of, rule_of)
    return lambda facts: None


def _moves_with_time(field: str) -> bool:
    head, _, name = field.partition(".")
    return head == "computed" and (name in TIME_DEPENDENT_COMPUTED or name == "recency_days")
