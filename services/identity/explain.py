"""Why two identifiers are, or are not, the same person: the chain of evidence and the guards on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise

from services.identity.graph import GuardDecision, GuardKind, IdentityGraph, Provenance
from services.identity.partition import IdKey
from shared.errors import ResourceExhausted

MAX_EXPLORED_IDENTIFIERS = 5000
EVIDENCE_PER_STEP = 5


@dataclass(frozen=True)
class Step:
    source: IdKey
    target: IdKey
    evidence: list[Provenance]


@dataclass
class Explanation:
    same_person: bool
    person_a: str
    person_b: str
    path: list[Step] = field(default_factory=list)
    blocking_guards: list[GuardDecision] = field(default_factory=list)
    summary: str = ""


def explain(graph: IdentityGraph, a: IdKey, b: IdKey) -> Explanation:
    persons = graph.persons_of([a, b])
    person_a, person_b = persons[a] or "", persons[b] or ""
    same = bool(person_a) and person_a == person_b
    # Within one person the chain stays inside the person; otherwise any evidence counts, so that a
    # chain cut by a guard can be shown with the guard that cut it.
    allowed = set(graph.person_members(person_a)) if same else None
    try:
        nodes = _shortest_path(graph, a, b, allowed)
    except _SearchTooLarge as error:
        raise ResourceExhausted(_too_large_message(error, a, b, same=same, person_a=person_a,
                                                  person_b=person_b),
                                reason="EXPLANATION_TOO_LARGE",
                                metadata={"steps_searched": str(error.steps_searched)}) from None
    result = Explanation(same_person=same, person_a=person_a, person_b=person_b)
    result.path = [Step(x, y, _evidence(graph, x, y)) for x, y in pairwise(nodes)]
    if not same:
        result.blocking_guards = _blocking_guards(graph, nodes, (a, b), (person_a, person_b))
    result.summary = _summary(result, a, b, found=bool(nodes))
    return result


class _SearchTooLarge(Exception):
    def __init__(self, steps_searched: int) -> None:
        super().__init__(steps_searched)
        self.steps_searched = steps_searched  # no chain of this many steps or fewer connects the pair


def _shortest_path(graph: IdentityGraph, a: IdKey, b: IdKey, allowed: set[IdKey] | None) -> list[IdKey]:
    """A shortest chain of links from `a` to `b` (empty when there is none), found breadth first from both
    ends at once: each round reads the neighbours of one whole level, on the side whose level is smaller,
    and the chain is found the moment an identifier reached from one end is one reached from the other.

    So a pair linked directly is explained by reading one end's neighbours, however many it has, and a
    densely linked identifier (a shared device) is only read through when the other side is larger. The
    two ends are always read; after that, more than MAX_EXPLORED_IDENTIFIERS identifiers reached without
    a chain is _SearchTooLarge, saying how many steps were ruled out."""
    if a == b:
        return [a]
    reached: tuple[dict[IdKey, IdKey | None], dict[IdKey, IdKey | None]] = ({a: None}, {b: None})
    levels: tuple[list[IdKey], list[IdKey]] = ([a], [b])
    depths = [0, 0]  # the levels each side has read: every identifier within that many steps is reached
    while levels[0] and levels[1]:
        # Both ends first: a chain of one or two links is found whatever their degrees.
        smaller = 0 if len(levels[0]) <= len(levels[1]) else 1
        side = depths.index(0) if 0 in depths else smaller
        here, there = reached[side], reached[1 - side]
        following: list[IdKey] = []
        for node in levels[side]:
            if depths[side] > 0 and len(reached[0]) + len(reached[1]) > MAX_EXPLORED_IDENTIFIERS:
                raise _SearchTooLarge(depths[0] + depths[1])
            for neighbour in sorted(graph.neighbours_of(node)):
                if neighbour in here or (allowed is not None and neighbour not in allowed):
                    continue
                here[neighbour] = node
                if neighbour in there:
                    return _chain(reached, neighbour)
                following.append(neighbour)
        levels[side][:] = following
        depths[side] += 1
    return []


def _chain(reached: tuple[dict[IdKey, IdKey | None], dict[IdKey, IdKey | None]], meeting: IdKey) -> list[IdKey]:
    """The chain a..meeting..b through the identifiers each side came from."""
    half_a, half_b = [meeting], [meeting]
    while (step := reached[0][half_a[-1]]) is not None:
        half_a.append(step)
    while (step := reached[1][half_b[-1]]) is not None:
        half_b.append(step)
    return half_a[::-1] + half_b[1:]


def _too_large_message(error: _SearchTooLarge, a: IdKey, b: IdKey, *, same: bool, person_a: str,
                       person_b: str) -> str:
    if same:
        verdict = f"they are the same person {person_a}"
    elif person_a and person_b:
        verdict = f"they are different persons, {person_a} and {person_b}"
    else:
        verdict = "at least one of them belongs to no person"
    return (f"no chain of {error.steps_searched} links or fewer connects {a} and {b}, and searching further would "
            f"read more than {MAX_EXPLORED_IDENTIFIERS} identifiers ({verdict}); to see the evidence, explain "
            f"each of them with an identifier you expect between them, e.g. one LookupPerson lists for its person")


def _evidence(graph: IdentityGraph, a: IdKey, b: IdKey) -> list[Provenance]:
    rows = graph.link_provenance(a, b)
    ordered = sorted(rows, key=lambda p: (p.event_time or datetime.min.replace(tzinfo=UTC), p.message_id))
    return ordered[:EVIDENCE_PER_STEP]


def _blocking_guards(graph: IdentityGraph, path: list[IdKey], pair: tuple[IdKey, IdKey],
                     persons: tuple[str, str]) -> list[GuardDecision]:
    (a, b), (person_a, person_b) = pair, persons
    decisions = []
    erased = graph.tombstoned({a, b})
    for key in sorted(erased):
        decisions.append(GuardDecision(key, GuardKind.ERASED, f"{key} belonged to an erased person"))
    for detail in graph.identifier_details(path):
        if detail.guard == GuardKind.BLOCKED_VALUE:
            decisions.append(GuardDecision(detail.identifier, detail.guard,
                                           f"{detail.identifier} is a blocked junk value: it links nothing"))
        elif detail.guard == GuardKind.SHARED_IDENTIFIER:
            decisions.append(GuardDecision(detail.identifier, detail.guard,
                                           f"{detail.identifier} is shared by several persons: it merges nobody"))
    if path and not decisions and person_a and person_b:
        # The evidence connects them through mergeable identifiers, so a per-person type limit split them.
        members_a, members_b = graph.person_members(person_a), graph.person_members(person_b)
        for identifier_type in graph.registry.all():
            if identifier_type.max_per_person <= 0:
                continue
            held_a = sorted(k for k in members_a if k.type == identifier_type.type)
            held_b = sorted(k for k in members_b if k.type == identifier_type.type)
            if held_a and held_b and len(set(held_a) | set(held_b)) > identifier_type.max_per_person:
                decisions.append(GuardDecision(
                    held_b[0], GuardKind.TYPE_LIMIT,
                    f"a person holds at most {identifier_type.max_per_person} {identifier_type.type}; "
                    f"{person_a} holds {', '.join(k.value for k in held_a)} and {person_b} holds "
                    f"{', '.join(k.value for k in held_b)}"))
    return decisions


def _summary(result: Explanation, a: IdKey, b: IdKey, *, found: bool) -> str:
    if result.same_person:
        hops = len(result.path)
        return (f"{a} and {b} are the same person {result.person_a}: linked in {hops} step"
                f"{'s' if hops != 1 else ''} of observed evidence.")
    if not found:
        return f"{a} and {b} are different persons: no observed evidence connects them."
    reasons = "; ".join(d.explanation for d in result.blocking_guards) or "the guards split them"
    return f"{a} and {b} are connected by evidence but kept apart: {reasons}."
