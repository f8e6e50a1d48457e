"""The identity graph on Cassandra: link, look up, and keep persons equal to the partition of the evidence.

Writes follow one protocol, whatever the operation:

1. The evidence is appended to the edge log (`links`, both directions) with plain idempotent writes.
2. Leases (lightweight transactions) are taken on the persons of the new evidence's identifiers and on
   those of them that have no person yet.
3. Under the leases the affected component is loaded: every identifier reachable through links that
   can merge (not through junk or shared identifiers) plus every member of every person touched, so
   that a person that must be split is seen whole. A component that needs more leases than were
   taken (it reaches other persons) gives them back and starts over with all it needs. Two writers
   whose evidence meets always share a lease, so their recomputations are serialized, and the later
   one sees both edges. Evidence that provably leaves one person whole and only adds new identifiers
   to it (a new cookie seen with a known device, or links the person already has, under new message
   ids) stops after the first step: the seeds and that person's members (IdentityGraph._attaches_to).
4. The partition of the component is computed (services.identity.partition) and person ids are
   assigned deterministically: a group keeps the oldest free person id among its identifiers'
   original persons (so merges converge on the oldest person and splits restore the merged ids).
   Every id merged away redirects to the person holding most of its original identifiers, directly:
   merges leave no chains of redirects behind (IdentityGraph._redirects).
5. The derived rows are written and the change is recorded in the feed; the leases are released.

A writer that dies half way leaves derived rows that the next full recomputation of the component
overwrites from the edge log (or the retry of its call: its observations are recorded only at the
end); its leases expire after 30 s.

A call works on all of its observations at once, because the Python driver spends ~0.2 ms of CPU per
statement and only ~5-20 us per key of an IN list or row of a batch: every read of a step is an IN
list per identifier type, every write goes out in unlogged batches, and the leases of all components
are taken together. A call of a few hundred observations thus costs tens of statements, not thousands.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import secrets
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

from onecdp.common.v1 import common_pb2

from services.identity import feed
from services.identity.combining import Combiner
from services.identity.feed import Change, ChangeType
from services.identity.identifiers import GuardPolicy, IdentifierRegistry, InvalidIdentifierValue
from services.identity.leases import Leases
from services.identity.partition import IdKey, Partition, partition, shared_identifiers
from services.identity.person import Person
from services.identity.recent import RecentLookups, Selected
from shared import deadline
from shared.cassandra import SERIAL_CONSISTENCY, CassandraSession
from shared.errors import (
    AlreadyExists,
    DomainError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Violations,
    control_character_problem,
)
from shared.event_times import EARLIEST_EVENT_TIME, MAX_FUTURE_SKEW

log = logging.getLogger(__name__)

MAX_OBSERVATIONS_PER_CALL = 1000
# Concurrent link calls are combined into batches of up to this many observations, this many working at
# once; a batch that waits for leases another process holds lets the next one start (Combiner.waiting).
# Two at once contended for the same persons in one process: in bench.identity each batch waited for
# the other's leases twice and took 3.7 rounds of leases, reads and writes; one took 30% less CPU per
# new observation, in identity and in Cassandra.
MAX_COMBINED_OBSERVATIONS = 2000
LINK_BATCHES_AT_ONCE = 1
MAX_IDENTIFIERS_PER_OBSERVATION = 32
# Provenance.source, as in profile (services/profile/model.py MAX_NAME_LENGTH).
MAX_SOURCE_LENGTH = 128
MAX_COMPONENT_IDENTIFIERS = 20_000
# After an erasure, the erased identifiers' neighbours are recomputed this many seed sets at a time.
NEIGHBOUR_SEEDS_PER_ROUND = 500
# ... and no more rounds start after this many seconds (a call without a deadline).
NEIGHBOUR_RECHECK_SECONDS = 30.0
LEASE_WAIT_SECONDS = 60.0
DEADLINE_MARGIN_SECONDS = 0.25
JUNK_MEMO_SIZE = 100_000
# Separates a remembered request's fingerprint from its result (hex digits, so never in it) in
# applied_requests.result; a result without it was stored before fingerprints were kept.
_FINGERPRINT_SEPARATOR = ":"
# onecdp.common.v1.SourceKind: an undefined number is a client bug, not a new kind of source.
SOURCE_KINDS = frozenset(common_pb2.SourceKind.values())


class GuardKind(IntEnum):
    # Values match onecdp.identity.v1.GuardKind.
    BLOCKED_VALUE = 1
    SHARED_IDENTIFIER = 2
    TYPE_LIMIT = 3
    ERASED = 4


@dataclass(frozen=True)
class Evidence:
    message_id: str
    source: str = ""
    source_kind: int = 0
    event_time: datetime | None = None
    # Why the event time sent is no datetime at all (seconds beyond years 1-9999, nanos outside 0-999999999),
    # worded for the caller; event_time is then None. Refused with the observation's other violations.
    event_time_problem: str = ""


@dataclass(frozen=True)
class RawObservation:
    """An observation as received: (type, value) pairs not yet normalized."""

    identifiers: Sequence[tuple[str, str]]
    evidence: Evidence


@dataclass(frozen=True)
class GuardDecision:
    identifier: IdKey
    guard: GuardKind
    explanation: str


@dataclass
class LinkOutcome:
    person_id: str = ""
    person_ids: list[str] = field(default_factory=list)
    merged_person_ids: list[str] = field(default_factory=list)
    normalized: list[IdKey] = field(default_factory=list)
    guard_decisions: list[GuardDecision] = field(default_factory=list)
    duplicate: bool = False
    # A duplicate whose message_id was applied with other identifiers than this observation names (the id was
    # reused for another message): none of this observation's identifiers were linked.
    other_identifiers: bool = False
    changes: list[Change] = field(default_factory=list)  # recorded by the reconciliation that applied it


@dataclass(frozen=True)
class Provenance:
    message_id: str
    source: str
    source_kind: int
    event_time: datetime | None


@dataclass(frozen=True)
class Retraction:
    person_ids: list[str]
    change: Change | None  # the first split of `changes`
    changes: list[Change]


@dataclass(frozen=True)
class Erasure:
    person_id: str
    identifier_count: int
    link_count: int
    change: Change


@dataclass(frozen=True)
class IdentifierDetails:
    identifier: IdKey
    first_seen: datetime | None
    last_seen: datetime | None
    observation_count: int
    guard: GuardKind | None


@dataclass
class _Component:
    nodes: set[IdKey] = field(default_factory=set)
    neighbours: dict[IdKey, set[IdKey]] = field(default_factory=dict)
    person_of: dict[IdKey, str | None] = field(default_factory=dict)
    origin_of: dict[IdKey, str | None] = field(default_factory=dict)
    guard_of: dict[IdKey, str | None] = field(default_factory=dict)
    junk: set[IdKey] = field(default_factory=set)
    # Set when the component's new identifiers only attach to this person (see _attaches_to).
    attaches_to: str | None = None

    def lease_keys(self) -> set[str]:
        # Unassigned junk identifiers need none: they join no person, and every writer writes the same row.
        return {_lease_key(n, p) for n in self.nodes if (p := self.person_of.get(n)) or n not in self.junk}

    def links(self) -> set[tuple[IdKey, IdKey]]:
        return {(a, b) if a < b else (b, a) for a in self.nodes for b in self.neighbours.get(a, ())
                if b in self.nodes and a != b}


@dataclass
class _Reconciled:
    partition: Partition
    group_ids: list[str]
    merged_into: dict[str, str]  # person merged away -> survivor
    changes: list[Change] = field(default_factory=list)
    erased: set[IdKey] = field(default_factory=set)  # seeds found tombstoned under the leases


@dataclass(frozen=True)
class _Assignment:
    """What an identifier's row says: its person, the person it was first assigned to, its guard."""

    person_id: str | None
    origin_person_id: str | None
    guard: str | None


_UNASSIGNED = _Assignment(None, None, None)


@dataclass
class _Reads:
    """Rows read under this call's leases, kept for as long as those leases stay held.

    An identifier's row and links read while its lease was held stay current as long as the lease
    is held: other writers change the row only under that lease, and evidence they append meanwhile
    is reconciled by them, under that lease, after us. A person's members likewise under the
    person's lease. So a component that reaches further keeps its leases, takes the ones it now
    needs, and reads again only what it had read without them.
    """

    assignments: dict[IdKey, _Assignment] = field(default_factory=dict)
    neighbours: dict[IdKey, set[IdKey]] = field(default_factory=dict)
    members: dict[str, list[IdKey]] = field(default_factory=dict)
    # Persons among `members` whose own columns are stored with their members (see _PERSON_TABLES).
    with_person_columns: set[str] = field(default_factory=set)
    # What the persons' static columns say that a plan needs: persons erased by a privacy request (their
    # ids are never given out again), and where each person merged away redirects.
    erased_persons: set[str] = field(default_factory=set)
    merged_into: dict[str, str] = field(default_factory=dict)
    # And the ids each lists as merged into it (see IdentityGraph._redirects).
    merged_from: dict[str, set[str]] = field(default_factory=dict)

    def keep_held(self, held: Set[str]) -> None:
        """Forget every row whose lease is not in `held` (read without it, or given back since)."""
        for key in [k for k, a in self.assignments.items() if _lease_key(k, a.person_id) not in held]:
            del self.assignments[key]
            self.neighbours.pop(key, None)
        for person_id in [p for p in self.members if _person_lease_key(p) not in held]:
            del self.members[person_id]
        self.with_person_columns &= self.members.keys()
        self.erased_persons &= self.members.keys()
        self.merged_into = {p: s for p, s in self.merged_into.items() if p in self.members}
        self.merged_from = {p: s for p, s in self.merged_from.items() if p in self.members}

    def forget_links(self) -> None:
        """Forget the rows that links decide (identifiers' rows and links, persons' members) after links
        were deleted; keep what the persons' own columns say, which deleting links does not change."""
        self.assignments.clear()
        self.neighbours.clear()
        self.members.clear()


@dataclass
class _Job:
    """Seed sets reconciled as one component: their indexes, seeds, the leases needed and those held."""

    indexes: list[int]
    seeds: set[IdKey]
    needed: set[str]
    held: set[str] = field(default_factory=set)


def _merged(jobs: Sequence[_Job]) -> list[_Job]:
    """Jobs whose needed leases overlap merged into one (they are one component)."""
    merged = []
    for cluster in _overlapping(range(len(jobs)), [job.needed for job in jobs]):
        if len(cluster) == 1:
            merged.append(jobs[cluster[0]])
            continue
        parts = [jobs[i] for i in cluster]
        merged.append(_Job(sorted(i for part in parts for i in part.indexes), set().union(*(p.seeds for p in parts)),
                           set().union(*(p.needed for p in parts)), set().union(*(p.held for p in parts))))
    return merged

_INSERT_LINK = ("INSERT INTO links (id_type, id_value, other_type, other_value, message_id, source, source_kind, "
                "event_time, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_SIGHTING = "INSERT INTO identifier_sightings (id_type, id_value, message_id, event_time) VALUES (?, ?, ?, ?)"
# A person's own columns live in `persons` and, since schema 0004, also as static columns of its members'
# partition in `person_identifiers`, so that a lookup reads a person with its identifiers in one request.
# Both are written by every change (one partition mutation: the same key in one keyspace); a person whose
# static create_time is null was created before 0004 (or erased) and is read from `persons`.
# A person created since then has no `persons` row at all: its columns are written to its members'
# partition only, and so are those of every person whose members were read with a create_time.
_PERSON_TABLES = ("persons", "person_identifiers")
_PERSON_COLUMNS = "person_id, merged_into, merged_from, erased, create_time, update_time"


def _person_writes(cql: str, params: Sequence[Any], *, columns_with_members: bool = False
                   ) -> list[tuple[str, Sequence[Any]]]:
    """A write of a person's own columns (`cql` names the table `{table}`): to both tables that may hold
    them, or only to its members' partition when they are known to be there (`columns_with_members`)."""
    tables = _PERSON_TABLES[1:] if columns_with_members else _PERSON_TABLES
    return [(cql.format(table=table), params) for table in tables]


@dataclass
class _Plan:
    """A recomputed component: the outcome, and what to write and record to make the stored rows match it."""

    reconciled: _Reconciled
    person_writes: list[tuple[str, Sequence[Any]]]
    identifier_writes: list[tuple[str, Sequence[Any]]]
    changes: list[tuple[ChangeType, list[str], list[str], str]]


def _values_by_type(keys: Iterable[IdKey]) -> dict[str, list[str]]:
    values: dict[str, list[str]] = defaultdict(list)
    for key in sorted(keys):
        values[key.type].append(key.value)
    return values


def _changes(old_persons: set[str], merged_into: dict[str, str], members_by_old: dict[str, list[str]],
             reason: str) -> list[tuple[ChangeType, list[str], list[str], str]]:
    """The merges and splits that turned `old_persons` into the new groups, for the change feed."""
    changes: list[tuple[ChangeType, list[str], list[str], str]] = []
    survivors: dict[str, list[str]] = defaultdict(list)
    for loser, winner in merged_into.items():
        survivors[winner].append(loser)
    for winner, losers in sorted(survivors.items()):
        changes.append((ChangeType.MERGE, [winner, *sorted(losers)], [winner], reason or "merged by new evidence"))
    for old in sorted(old_persons):
        destinations = sorted(set(members_by_old.get(old, [])))
        if len(destinations) > 1:
            ordered = [old, *[d for d in destinations if d != old]] if old in destinations else destinations
            changes.append((ChangeType.SPLIT, [old], ordered, reason or "split: guards recomputed from the edge log"))
    return changes


def _lease_key(key: IdKey, person_id: str | None) -> str:
    """The lease guarding an identifier: its person's, or its own while it has no person."""
    return _person_lease_key(person_id) if person_id else f"i:{key}"


def _person_lease_key(person_id: str) -> str:
    """The lease guarding a person's identifiers (its members)."""
    return f"p:{person_id}"


def _erased_decision(key: IdKey) -> GuardDecision:
    return GuardDecision(key, GuardKind.ERASED,
                         f"{key.type} was erased by a privacy request; DeleteErasureTombstone allows it again")


def _overlapping(indexes: Sequence[int], keys_of: Sequence[set[str]]) -> list[list[int]]:
    """`indexes` grouped so that any two whose key sets share a key are in one group."""
    parent = {i: i for i in indexes}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for index in indexes:
        for key in keys_of[index]:
            if key in owner:
                parent[find(index)] = find(owner[key])
            else:
                owner[key] = index
    groups: dict[int, list[int]] = defaultdict(list)
    for index in indexes:
        groups[find(index)].append(index)
    return list(groups.values())


def new_person_id() -> str:
    """Time-ordered ids: comparing two ids compares their creation times (oldest wins a merge)."""
    return f"p_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


# What a person id can look like. new_person_id mints "p_" and 24 lowercase hex digits; the form is
# the wider "p_" and lowercase letters and digits because callers (profile, prediction) pass ids like
# "p_nobody" that must stay NOT_FOUND / found=false, while an id outside it (spaces, capitals, no
# prefix) can never exist and is INVALID_ARGUMENT naming the field (AIP-193).
PERSON_ID_PATTERN = re.compile(r"p_[0-9a-z]{1,62}")
PERSON_ID_FORM = "'p_' followed by lowercase letters and digits, as LinkIdentifiers returns it"


def check_person_id(person_id: str, field_path: str) -> str:
    """`person_id` if it has the form of a person id; InvalidArgument naming `field_path` otherwise."""
    if not person_id:
        raise InvalidArgument.for_field(field_path, f"required: a person id, {PERSON_ID_FORM}",
                                        reason="PERSON_ID_REQUIRED")
    if not PERSON_ID_PATTERN.fullmatch(person_id):
        raise InvalidArgument.for_field(field_path, f"{person_id[:80]!r} is not a person id: expected "
                                        f"{PERSON_ID_FORM}", reason="INVALID_PERSON_ID")
    return person_id


MAX_MESSAGE_ID_LENGTH = 128


def _message_id_problem(message_id: str) -> str | None:
    """Why `message_id` cannot be an observation's message id, or None."""
    if not 0 < len(message_id) <= MAX_MESSAGE_ID_LENGTH:
        return f"required, 1-{MAX_MESSAGE_ID_LENGTH} characters"
    return control_character_problem(message_id)


def check_message_id(message_id: str, field_path: str) -> str:
    """`message_id` if it can be an observation's message id; InvalidArgument naming `field_path` otherwise."""
    problem = _message_id_problem(message_id)
    if problem:
        raise InvalidArgument.for_field(field_path, problem, reason="INVALID_MESSAGE_ID")
    return message_id


def _now() -> datetime:
    return datetime.now(UTC)


def _check_evidence(evidence: Evidence, path: str, now: datetime, violations: Violations) -> None:
    """Adds to `violations` what is wrong with an observation's provenance besides its message id."""
    violations.check(len(evidence.source) <= MAX_SOURCE_LENGTH, f"{path}.source",
                     f"at most {MAX_SOURCE_LENGTH} characters, got {len(evidence.source)}")
    if evidence.event_time_problem:
        violations.add(f"{path}.event_time", evidence.event_time_problem)
    if evidence.event_time is not None:
        event_time = evidence.event_time.isoformat()
        violations.check(evidence.event_time <= now + MAX_FUTURE_SKEW, f"{path}.event_time",
                         f"{event_time} is more than 1 day in the future; send the time the event happened, in UTC")
        violations.check(evidence.event_time >= EARLIEST_EVENT_TIME, f"{path}.event_time",
                         f"{event_time} is before 1990-01-01; send the time the event happened, in UTC")
    violations.check(evidence.source_kind in SOURCE_KINDS, f"{path}.source_kind",
                     f"{evidence.source_kind} is not a onecdp.common.v1.SourceKind value; use one of "
                     f"{sorted(SOURCE_KINDS)} (0: unspecified)")


def _utc(value: datetime | None) -> datetime | None:
    # The driver returns naive datetimes in UTC.
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class IdentityGraph:
    def __init__(self, session: CassandraSession, registry: IdentifierRegistry | None = None,
                 policy: GuardPolicy | None = None) -> None:
        self._session = session
        self.registry = registry or IdentifierRegistry()
        self.policy = policy or GuardPolicy()
        self._leases = Leases(session)
        self._tombstone_salt: bytes | None = None
        self._junk_memo: dict[IdKey, bool] = {}
        self._recent = RecentLookups()
        # Replaced by IdentitySettings when stored settings are installed (see _attaches_to).
        self._initial_policy, self._initial_registry = self.policy, self.registry
        self._junk_memo_policy: GuardPolicy | None = None
        self._junk_memo_registry: IdentifierRegistry | None = None
        self._links: Combiner[tuple[Sequence[RawObservation], list[list[IdKey]]], list[LinkOutcome]] = Combiner(
            self._link_calls, size_of=lambda call: len(call[0]), max_size=MAX_COMBINED_OBSERVATIONS,
            concurrency=LINK_BATCHES_AT_ONCE)

    # ---- validation -------------------------------------------------------------------------------

    def normalize_observations(self, observations: Sequence[RawObservation]) -> list[list[IdKey]]:
        """Every observation's identifiers normalized; InvalidArgument naming every bad field otherwise."""
        if len(observations) > MAX_OBSERVATIONS_PER_CALL:
            raise ResourceExhausted(f"{len(observations)} observations in one call; at most "
                                    f"{MAX_OBSERVATIONS_PER_CALL} are allowed, split the batch",
                                    reason="BATCH_TOO_LARGE")
        violations = Violations()
        violations.check(bool(observations), "observations", "at least one observation is required")
        now = _now()
        normalized: list[list[IdKey]] = []
        for i, observation in enumerate(observations):
            path = f"observations[{i}]"
            message_problem = _message_id_problem(observation.evidence.message_id)
            if message_problem:
                violations.add(f"{path}.provenance.message_id", message_problem)
            violations.check(0 < len(observation.identifiers) <= MAX_IDENTIFIERS_PER_OBSERVATION,
                             f"{path}.identifiers", f"1-{MAX_IDENTIFIERS_PER_OBSERVATION} identifiers required")
            _check_evidence(observation.evidence, f"{path}.provenance", now, violations)
            keys: list[IdKey] = []
            for j, (type_name, value) in enumerate(observation.identifiers):
                try:
                    keys.append(IdKey(type_name, self.registry.normalize(type_name, value)))
                except InvalidIdentifierValue as error:
                    field_name = "type" if self.registry.get(type_name) is None else "value"
                    violations.add(f"{path}.identifiers[{j}].{field_name}", str(error))
            normalized.append(sorted(set(keys)))
        violations.raise_if_any("some observations are invalid; nothing was linked", reason="INVALID_OBSERVATION")
        return normalized

    # ---- linking ----------------------------------------------------------------------------------

    def link(self, observations: Sequence[RawObservation]) -> list[LinkOutcome]:
        """Apply observations in order; one outcome per observation.

        Calls made concurrently in this process are applied together (see combining.py).
        """
        normalized = self.normalize_observations(observations)
        return self._links.submit((observations, normalized))

    def _link_calls(self, calls: Sequence[tuple[Sequence[RawObservation], list[list[IdKey]]]]
                    ) -> list[list[LinkOutcome]]:
        """The observations of several calls applied at once; the outcomes of each call."""
        outcomes = self._link_normalized([o for observations, _ in calls for o in observations],
                                         [keys for _, normalized in calls for keys in normalized])
        split = []
        for observations, _ in calls:
            split.append(outcomes[:len(observations)])
            outcomes = outcomes[len(observations):]
        return split

    def _link_normalized(self, observations: Sequence[RawObservation],
                         normalized: list[list[IdKey]]) -> list[LinkOutcome]:
        outcomes = [LinkOutcome(normalized=keys) for keys in normalized]
        # Two independent reads for the whole call, issued together and waited for once. Erasure
        # tombstones are not read here: identifiers of erased persons must not be linked again (a late
        # or replayed event must not bring back what a privacy request removed), but that is decided
        # under the leases anyway (an erasure may come between a check here and the leases, see
        # _reconcile_held), and only identifiers without a person can be erased. A check here too
        # read every identifier's tombstone twice, about a fifth of the partitions a link call reads,
        # to spare the rare replay of erased identifiers appending evidence that is then dropped.
        all_keys = {k for keys in normalized for k in keys}
        read_known = self._known_observations_async(o.evidence.message_id for o in observations)
        read_assignments = self._assignments_async(all_keys)
        known, assignments = read_known(), read_assignments()
        pending: list[int] = []
        # A message id repeated within the observations applied together (one call, or concurrent calls
        # combined): the first is applied, the later ones are answered as replays of it.
        first_of: dict[str, int] = {}
        repeats: dict[int, int] = {}
        for index, observation in enumerate(observations):
            message_id = observation.evidence.message_id
            applied = known.get(message_id)
            if applied is not None:
                # A replay answers with what was applied under its message id, which is not what this
                # call sent when the payload differs (nothing of it is linked).
                outcome = outcomes[index]
                outcome.other_identifiers = set(applied) != set(normalized[index])
                outcome.duplicate, outcome.normalized = True, applied
            elif message_id in first_of:
                repeats[index] = first_of[message_id]
            else:
                first_of[message_id] = index
                pending.append(index)
        # Observations in one call that share identifiers are reconciled together, in one component.
        seed_groups = _group_by_shared_identifiers([normalized[i] for i in pending])
        # Written while the leases are taken: a component is loaded only once its evidence is stored.
        appended = self._start_appending_evidence([(normalized[i], observations[i].evidence) for i in pending])

        def record(reconciled: Sequence[_Reconciled]) -> None:
            # An observation naming an identifier found erased under the leases linked nothing (see
            # _reconcile_held): it is not recorded as applied, so that a replay is dropped again while the
            # tombstone stands, and links once DeleteErasureTombstone has lifted it.
            erased = {k for r in reconciled for k in r.erased}
            self._record_observations([(normalized[i], observations[i].evidence) for i in pending
                                       if erased.isdisjoint(normalized[i])])

        reconciled_groups = self.reconcile_many(
            [{k for g in group for k in normalized[pending[g]]} for group in seed_groups],
            [f"observation {observations[pending[group[0]]].evidence.message_id}" for group in seed_groups],
            persons={k: a.person_id for k, a in assignments.items()}, appended=appended, then=record,
            evidence=[[(normalized[pending[g]], observations[pending[g]].evidence.message_id) for g in group]
                      for group in seed_groups])
        appended()
        results: dict[int, _Reconciled] = {}
        for group, reconciled in zip(seed_groups, reconciled_groups, strict=True):
            for g in group:
                results[pending[g]] = reconciled
        # A repeat of an observation dropped for an erasure was not applied under its message id either: it is
        # applied now, as the first of its id (dropped again if it too names an erased identifier).
        again = [index for index, first in repeats.items() if not results[first].erased.isdisjoint(normalized[first])]
        for index, first in repeats.items():
            if index not in again:
                outcomes[index].other_identifiers = set(normalized[index]) != set(normalized[first])
                outcomes[index].normalized = list(normalized[first])
                outcomes[index].duplicate = True  # answered below like a replay: the persons its identifiers hold
        duplicates = [outcome for index, outcome in enumerate(outcomes) if index not in results and index not in again]
        persons = self.persons_of({k for outcome in duplicates for k in outcome.normalized})
        for index, outcome in enumerate(outcomes):
            if index in results:
                _describe_outcome(outcome, results[index], self.registry)
            elif index not in again:
                _describe_unchanged(outcome, persons, self.registry)
        if again:
            reapplied = self._link_normalized([observations[i] for i in again], [normalized[i] for i in again])
            for index, outcome in zip(again, reapplied, strict=True):
                outcomes[index] = outcome
        return outcomes

    def _start_appending_evidence(self, items: Sequence[tuple[list[IdKey], Evidence]]) -> Callable[[], None]:
        """Start writing the links and sightings of `items`; call the result to wait for them."""
        recorded = _now()
        statements: list[tuple[str, Sequence[Any]]] = []
        for keys, evidence in items:
            event_time = evidence.event_time or recorded
            for a in keys:
                statements.append((_INSERT_SIGHTING, (a.type, a.value, evidence.message_id, event_time)))
                statements += [(_INSERT_LINK, (a.type, a.value, b.type, b.value, evidence.message_id, evidence.source,
                                               evidence.source_kind, event_time, recorded)) for b in keys if a != b]
        return self._session.start_writes(statements)

    def _record_observations(self, items: Sequence[tuple[list[IdKey], Evidence]]) -> None:
        recorded = _now()
        self._session.write_all([
            ("INSERT INTO observations (message_id, identifiers, source, source_kind, event_time, recorded_at) "
             "VALUES (?, ?, ?, ?, ?, ?)",
             (e.message_id, [(k.type, k.value) for k in keys], e.source, e.source_kind, e.event_time or recorded,
              recorded)) for keys, e in items])

    # ---- batched reads ----------------------------------------------------------------------------
    # Each starts its reads at once (IN lists, see CassandraSession.select_in) and returns a function
    # that waits for them, so that independent reads overlap.

    def _assignments_async(self, keys: Iterable[IdKey]) -> Callable[[], dict[IdKey, _Assignment]]:
        wanted = set(keys)
        pending = [(type_name, self._session.select_in(
                        "SELECT id_value, person_id, origin_person_id, guard FROM identifiers "
                        "WHERE id_type = ? AND id_value IN ?", (type_name,), values))
                   for type_name, values in _values_by_type(wanted).items()]

        def collect() -> dict[IdKey, _Assignment]:
            found = {IdKey(type_name, r.id_value): _Assignment(r.person_id, r.origin_person_id, r.guard)
                     for type_name, rows in pending for r in rows.rows()}
            return {k: found.get(k, _UNASSIGNED) for k in wanted}
        return collect

    def _neighbours_async(self, keys: Iterable[IdKey]) -> Callable[[], dict[IdKey, set[IdKey]]]:
        wanted = set(keys)
        # One row per observation that linked a pair (GROUP BY would fold them on the server, but
        # Cassandra warns about aggregation over an IN list on every such query).
        pending = [(type_name, self._session.select_in(
                        "SELECT id_value, other_type, other_value FROM links WHERE id_type = ? AND id_value IN ?",
                        (type_name,), values))
                   for type_name, values in _values_by_type(wanted).items()]

        def collect() -> dict[IdKey, set[IdKey]]:
            neighbours: dict[IdKey, set[IdKey]] = {k: set() for k in wanted}
            for type_name, rows in pending:
                for r in rows.rows():
                    neighbours[IdKey(type_name, r.id_value)].add(IdKey(r.other_type, r.other_value))
            return neighbours
        return collect

    def _members_async(self, person_ids: Iterable[str], reads: _Reads) -> Callable[[], None]:
        """Start reading persons' members, with what their static columns say, into `reads` (wait with the
        returned function). Erased persons are known whatever layout they had: erase marks them here."""
        wanted = set(person_ids)
        rows = self._session.select_in(
            "SELECT person_id, id_type, id_value, create_time, erased, merged_into, merged_from "
            "FROM person_identifiers WHERE person_id IN ?", (), sorted(wanted))

        def collect() -> None:
            reads.members.update({p: [] for p in wanted})
            for r in rows.rows():
                if r.id_type is not None:  # else a partition holding only the person's static columns
                    reads.members[r.person_id].append(IdKey(r.id_type, r.id_value))
                if r.create_time is not None:
                    reads.with_person_columns.add(r.person_id)
                if r.erased:
                    reads.erased_persons.add(r.person_id)
                if r.merged_into:
                    reads.merged_into[r.person_id] = r.merged_into
                if r.merged_from:
                    reads.merged_from[r.person_id] = set(r.merged_from)
        return collect

    def _tombstones_async(self, keys: Iterable[IdKey]) -> Callable[[], set[IdKey]]:
        key_of_hash = {self.tombstone_hash(k): k for k in keys}
        rows = self._session.select_in("SELECT identifier_hash FROM erasure_tombstones WHERE identifier_hash IN ?",
                                       (), sorted(key_of_hash))
        return lambda: {key_of_hash[r.identifier_hash] for r in rows.rows()}

    def _known_observations_async(self, message_ids: Iterable[str]) -> Callable[[], dict[str, list[IdKey]]]:
        """Message ids already applied -> the identifiers applied under each (normalized, sorted)."""
        rows = self._session.select_in("SELECT message_id, identifiers FROM observations WHERE message_id IN ?", (),
                                       sorted(set(message_ids)))
        return lambda: {r.message_id: sorted(IdKey(t, v) for t, v in r.identifiers or ()) for r in rows.rows()}

    # ---- reconciliation ---------------------------------------------------------------------------

    def reconcile(self, seeds: set[IdKey], reason: str = "") -> _Reconciled:
        """Recompute the persons of the component around `seeds` under leases (see the module doc)."""
        return self.reconcile_many([seeds], [reason])[0]

    def reconcile_many(self, seed_sets: Sequence[set[IdKey]], reasons: Sequence[str],
                       persons: Mapping[IdKey, str | None] | None = None,
                       appended: Callable[[], None] | None = None,
                       then: Callable[[Sequence[_Reconciled]], None] | None = None, *,
                       evidence: Sequence[Sequence[tuple[list[IdKey], str]]] | None = None) -> list[_Reconciled]:
        """Recompute the components around each seed set under leases; one result per seed set.

        Works in rounds. Each round takes the leases every component still lacks (few lightweight
        transactions for all of them, see leases.py), loads all components that hold theirs together
        (one IN read per identifier type per breadth-first step, whatever their number), recomputes
        them and writes them in batches. Seed sets whose leases overlap are one component. A
        component found to reach beyond its leases keeps them, takes the ones it now needs in the
        next round and reads again only what it had read without them (see _Reads); one whose
        leases other writers hold gives back what it has and waits, with backoff, until they are
        given back. `persons` may give the seeds' current persons, read by the caller; `appended`
        waits for evidence still being written, which must be stored before a component is loaded;
        `then` is work to do once every component is reconciled, while the last leases are given back;
        it is given the results, one per seed set. `evidence` gives, per seed set, the observations just
        appended for it (their identifiers and message ids): one naming an erased identifier links
        nothing (see _reconcile_held).
        """
        # Give up a little before the caller's deadline, so that it learns why (COMPONENT_CONTENDED).
        left = deadline.remaining()
        give_up = time.monotonic() + (LEASE_WAIT_SECONDS if left is None
                                      else min(LEASE_WAIT_SECONDS, max(0.0, left - DEADLINE_MARGIN_SECONDS)))
        results: dict[int, _Reconciled] = {}
        jobs = [_Job([index], seeds, needed)
                for index, (seeds, needed) in enumerate(zip(seed_sets, self._seed_lease_keys(seed_sets, persons),
                                                            strict=True))]
        owner = uuid.uuid4().hex
        reads = _Reads()
        # Leases of finished components, given back while the next round takes its own: (keys, wait).
        releasing: list[tuple[set[str], Callable[[], None]]] = []
        attempt = rounds = 0
        try:
            while jobs:
                # Checked on every round, not only after waiting: a component that other writers keep
                # extending could otherwise ask for more leases round after round.
                if rounds and time.monotonic() > give_up:
                    raise Unavailable("the identity component is busy with other writers; retry the call",
                                      reason="COMPONENT_CONTENDED", metadata={"components_waiting": str(len(jobs))})
                rounds += 1
                jobs = _merged(jobs)
                short = [job for job in jobs if not job.needed <= job.held]
                missing = {k for job in short for k in job.needed - job.held}
                for keys, wait in [r for r in releasing if r[0] & missing]:
                    wait()  # ours until given back: taken again once they are
                    releasing.remove((keys, wait))
                granted = self._leases.acquire_groups([job.needed - job.held for job in short], owner)
                # The rest were given back while taking these; nothing is left pending while this call
                # works or waits (two calls each waiting for what the other is giving back would wait
                # until their deadlines).
                for _, wait in releasing:
                    wait()
                releasing.clear()
                if appended is not None:
                    appended()
                    appended = None
                blocked = [job for job, ok in zip(short, granted, strict=True) if not ok]
                for job, ok in zip(short, granted, strict=True):
                    if ok:
                        job.held |= job.needed
                # Hold nothing while waiting: two writers each holding what the other needs would
                # otherwise wait for each other until their leases expire.
                self._give_back(blocked, owner, reads, jobs)[1]()
                ready = [job for job in jobs if job.needed <= job.held]
                if ready:
                    outcomes = self._reconcile_held(
                        [job.seeds for job in ready], [job.held for job in ready],
                        [reasons[job.indexes[0]] for job in ready], reads, persons,
                        evidence=None if evidence is None
                        else [[o for i in job.indexes for o in evidence[i]] for job in ready])
                    finished = []
                    for job, outcome in zip(ready, outcomes, strict=True):
                        if isinstance(outcome, _Reconciled):
                            results.update(dict.fromkeys(job.indexes, outcome))
                            finished.append(job)
                        else:
                            job.needed = outcome | job.held
                    releasing.append(self._give_back(finished, owner, reads, jobs))
                    jobs = [job for job in jobs if job.indexes[0] not in results]
                    reads.keep_held({k for job in jobs for k in job.held})
                if blocked:
                    attempt += 1
                    # Woken when a lease comes back in this process; leases of other processes are
                    # polled for, with backoff.
                    pause = min(0.2, 0.005 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1.5)
                    with self._links.waiting():
                        self._leases.wait(set().union(*(job.needed for job in blocked)),
                                          min(pause, max(0.0, give_up - time.monotonic())))
            if then is not None:
                then([results[i] for i in range(len(seed_sets))])
        finally:
            releasing.append(self._give_back(jobs, owner, reads, jobs))
            for _, wait in releasing:
                wait()
        return [results[i] for i in range(len(seed_sets))]

    def _give_back(self, jobs_done: Sequence[_Job], owner: str, reads: _Reads,
                   jobs: Sequence[_Job]) -> tuple[set[str], Callable[[], None]]:
        """Start releasing the leases of `jobs_done`: (the leases, a function that waits for the release).

        What was read under them is forgotten at once: it is no longer known to be current.
        """
        owners = {k: owner for job in jobs_done for k in job.held}
        if not owners:
            return set(), lambda: None
        for job in jobs_done:
            job.held = set()
        reads.keep_held({k for job in jobs for k in job.held})
        return set(owners), self._leases.start_release(owners)

    def _seed_lease_keys(self, seed_sets: Sequence[set[IdKey]],
                         persons: Mapping[IdKey, str | None] | None) -> list[set[str]]:
        """The leases each seed set needs as far as its seeds' own rows tell (the component may need more)."""
        unknown = {k for seeds in seed_sets for k in seeds} - (persons or {}).keys()
        found = {**(persons or {}), **self.persons_of(unknown)} if unknown else persons or {}
        return [{_lease_key(k, found[k]) for k in seeds if found[k] or not self._is_junk(k)} for seeds in seed_sets]

    def _reconcile_held(self, seed_sets: Sequence[set[IdKey]], helds: Sequence[set[str]],
                        reasons: Sequence[str], reads: _Reads | None = None,
                        persons: Mapping[IdKey, str | None] | None = None, *,
                        evidence: Sequence[Sequence[tuple[list[IdKey], str]]] | None = None
                        ) -> list[_Reconciled | set[str]]:
        """Under the leases `helds`: each component recomputed, or the leases it needs when it reaches further.

        `reads` holds rows read earlier under leases still held (see _Reads); they are not read again.
        `persons`, the seeds' persons as the caller read them, lets the first step read their members.
        `evidence`, per seed set, the observations just appended for it: (identifiers, message id).
        """
        reads = reads if reads is not None else _Reads()
        # Seeds erased by a privacy request (before the call, or before these leases were taken: erase
        # holds the leases of what it tombstones) are not linked again: drop the evidence just appended.
        # Erasure deletes the identifier rows it tombstones, so only seeds without a person can be
        # erased: those the caller found without one are read alongside the components (the leases
        # are held already), and those it found with one but that have none now, after them.
        unassigned = {k for seeds in seed_sets for k in seeds if persons is None or not persons.get(k)}
        read_erased = self._tombstones_async(unassigned)
        components = self._load_components(seed_sets, reads, persons)
        erased = read_erased()
        gone = {k for seeds, component in zip(seed_sets, components, strict=True) for k in seeds
                if k not in unassigned and not component.person_of.get(k)}
        if gone:
            erased |= self._tombstones_async(gone)()
        erased_seeds = [{k for k in erased & seeds if not component.person_of.get(k)}
                        for seeds, component in zip(seed_sets, components, strict=True)]
        dropping = [index for index, erased_here in enumerate(erased_seeds) if erased_here]
        if dropping:
            # An observation naming an erased identifier came from the erased person: privacy first, it
            # links nothing, its other identifiers not among themselves either (profile rejects such an
            # event whole); each of them is kept as if seen alone. What other observations linked stays.
            dropped = [(keys, message_id) for i in dropping for keys, message_id in (evidence[i] if evidence else ())
                       if not erased_seeds[i].isdisjoint(keys)]
            # All at once: a call replaying many erased identifiers drops them in one round of writes.
            self._drop_erased_evidence([(erased_seeds[i], seed_sets[i]) for i in dropping], dropped)
            # The links just deleted may be among what was read. What the persons' own columns say does
            # not depend on links: the components not reloaded still plan with it.
            reads.forget_links()
            reloaded = self._load_components([seed_sets[i] - erased_seeds[i] for i in dropping], reads)
            for index, component in zip(dropping, reloaded, strict=True):
                components[index] = component
        outcomes: list[_Reconciled | set[str]] = []
        plans: list[_Plan] = []
        changed_persons: set[str] = set()
        changed_keys: set[IdKey] = set()
        for component, held, reason, erased_here in zip(components, helds, reasons, erased_seeds, strict=True):
            needed = component.lease_keys()
            if not needed <= held:
                outcomes.append(needed)
                continue
            plan = (self._plan_attachment(component, reads.with_person_columns) if component.attaches_to
                    else self._plan(component, reason, reads))
            plan.reconciled.erased = erased_here
            plans.append(plan)
            outcomes.append(plan.reconciled)
            # Also when nothing is written now: an earlier attempt's write (timed out, applied late) may have
            # changed them after a lookup read them.
            merged_into = plan.reconciled.merged_into
            changed_persons.update(plan.reconciled.group_ids, merged_into, merged_into.values(),
                                   (p for p in component.person_of.values() if p))
            changed_keys.update(component.nodes)
        # Identifier rows last: a writer that dies half way leaves them unchanged where anything else
        # was left undone, so the next recomputation sees those identifiers as changed and redoes it.
        # The changes are recorded while the identifier rows are written (neither depends on the other):
        # a writer that dies meanwhile may leave the feed short of a change or, retried, record one
        # twice, as it could when they were written one after the other.
        try:
            self._session.write_all([s for plan in plans for s in plan.person_writes])
            identifiers_written = self._session.start_writes([s for plan in plans for s in plan.identifier_writes])
            recorded = iter(feed.record_many(self._session, [c for plan in plans for c in plan.changes]))
            identifiers_written()
        finally:
            # Also when a write failed: some may have been applied.
            if plans:
                self._recent.forget(changed_persons, changed_keys)
        for plan in plans:
            plan.reconciled.changes = [next(recorded) for _ in plan.changes]
        return outcomes

    def _drop_erased_evidence(self, erased_in: Sequence[tuple[set[IdKey], set[IdKey]]],
                              observations: Sequence[tuple[list[IdKey], str]] = ()) -> None:
        """Delete the evidence just appended for erased identifiers: (erased, the seeds linked with them),
        and every link `observations` (identifiers, message id), which named erased ones, made."""
        # The erased identifiers' own partitions go whole (below); only the other direction, in the
        # partitions of the seeds that stay, is deleted pair by pair.
        erased_keys = {k for erased, _ in erased_in for k in erased}
        pairs = [(b, a) for erased, seeds in erased_in for a in erased for b in seeds if b not in erased]
        self._session.write_all(
            [("DELETE FROM links WHERE id_type = ? AND id_value = ? AND other_type = ? AND other_value = ? "
              "AND message_id = ?", (a.type, a.value, b.type, b.value, message_id))
             for keys, message_id in observations for a in keys for b in keys
             if a != b and a not in erased_keys and b not in erased_keys]
            + [("DELETE FROM links WHERE id_type = ? AND id_value = ? AND other_type = ? AND other_value = ?",
              (a.type, a.value, b.type, b.value)) for a, b in pairs]
            + [(f"DELETE FROM {table} WHERE id_type = ? AND id_value = ?", (k.type, k.value))
               for erased, _ in erased_in for k in erased for table in ("links", "identifier_sightings")])

    def _load_components(self, seed_sets: Sequence[set[IdKey]], reads: _Reads,
                         persons: Mapping[IdKey, str | None] | None = None) -> list[_Component]:
        """The components around each seed set, loaded breadth first, all together.

        A component is every identifier reachable through links that can merge (not through junk or
        shared identifiers) plus every member of every person touched, so that a person that must be
        split is seen whole. Each step reads, in one round trip, the rows and links of the whole
        identifier frontier of every component and the members of the persons the previous step
        found; rows already in `reads` are not read again. The first step also reads the members of
        the seeds' persons as `persons` gives them (if a seed has moved since, its person's members
        are one more closed part of the component, read for nothing).
        """
        components = [_Component() for _ in seed_sets]
        node_frontiers = [set(seeds) for seeds in seed_sets]
        person_frontiers = [{p for k in seeds if (p := (persons or {}).get(k))} for seeds in seed_sets]
        loaded_persons = [set(found) for found in person_frontiers]
        first_step = True
        while any(node_frontiers) or any(person_frontiers):
            self._read(reads, set().union(*node_frontiers), set().union(*person_frontiers))
            for index, component in enumerate(components):
                batch = sorted(node_frontiers[index] - component.nodes)
                if len(component.nodes) + len(batch) > MAX_COMPONENT_IDENTIFIERS:
                    raise ResourceExhausted(
                        f"the component around these identifiers exceeds {MAX_COMPONENT_IDENTIFIERS} identifiers; a "
                        "junk or shared identifier is probably missing from the guard policy",
                        reason="COMPONENT_TOO_LARGE")
                junk: set[IdKey] = set()
                for key in batch:
                    assignment = reads.assignments[key]
                    component.nodes.add(key)
                    component.person_of[key] = assignment.person_id
                    component.origin_of[key] = assignment.origin_person_id
                    component.guard_of[key] = assignment.guard
                    component.neighbours[key] = reads.neighbours[key]
                    if self._is_junk(key):
                        junk.add(key)
                component.junk |= junk
                shared = self._shared_among(batch, component, junk)
                frontier: set[IdKey] = set()
                for key in batch:
                    if key not in junk and key not in shared:
                        frontier.update(n for n in reads.neighbours[key] if not self._is_junk(n))
                for person_id in person_frontiers[index]:
                    frontier.update(reads.members[person_id])
                # Origin persons too: a group may only take back its original person id if that person is
                # not still held by others, and that is only known when the origin's members are loaded.
                found = {p for k in batch for p in (component.person_of[k], component.origin_of[k])
                         if p} - loaded_persons[index]
                loaded_persons[index] |= found
                person_frontiers[index] = found
                node_frontiers[index] = frontier - component.nodes
                if first_step and persons is not None:
                    component.attaches_to = self._attaches_to(component, persons, reads)
                    if component.attaches_to is not None:
                        person_frontiers[index], node_frontiers[index] = set(), set()
            first_step = False
        return components

    def _attaches_to(self, component: _Component, persons: Mapping[IdKey, str | None], reads: _Reads) -> str | None:
        """The person P when the component's new evidence keeps P whole and only adds new identifiers to it.

        Then the partition of the whole component is the stored one with the new identifiers added to
        P, so it need not be loaded past the seeds (`component.nodes`, read under their leases) and P's
        members. The conditions: every assigned seed belongs to P (as the caller read it too), has no
        guard and is not junk; every other seed is new (no row, no links beyond the seeds), of a type
        without a per-person limit and not junk; no seed is shared once the new links count; P's
        strongest identifier stays the same. Why they suffice for partition.partition: links between
        identifiers of one final group never change the groups (a union they add early joins parts
        that end up together anyway, within the limits, and every union blocked before stays blocked);
        a type without a limit takes part in no limit conflict, so adding it to P's group blocks or
        unblocks no union; new links only change the neighbourhoods of seeds, so only seeds can become
        shared; and with P's strongest identifier unchanged, groups take person ids in the same order
        (_assign_person_ids). A replay of links already made, under new message ids, is such a case.

        It relies on the stored rows being the partition of the stored evidence under the policy in
        force, which every full recomputation leaves behind. Hence only while the policy and types
        this graph started with are in force: persons judged under an older policy are judged again
        when new evidence touches them, by a full recomputation. Evidence left unreconciled by a writer
        that died is reconciled by the retry of its call (its observation is not recorded until then)
        or by the next full recomputation of the component.
        """
        if self.policy is not self._initial_policy or self.registry is not self._initial_registry:
            return None
        assigned = {k for k in component.nodes if component.person_of.get(k)}
        person_id = component.person_of[min(assigned)] if assigned else None
        if person_id is None or person_id not in reads.members:
            return None
        members = reads.members[person_id]
        for key in assigned:
            if component.person_of[key] != person_id or persons.get(key) != person_id or component.guard_of.get(key) \
                    or self._is_junk(key) or key not in members:
                return None
        new = component.nodes - assigned
        for key in new:
            identifier_type = self.registry.get(key.type)
            if identifier_type is None or identifier_type.max_per_person > 0 or self._is_junk(key) \
                    or component.origin_of.get(key) or component.guard_of.get(key) \
                    or not component.neighbours[key] <= component.nodes:
                return None
        neighbourhoods = {k: component.neighbours[k] for k in component.nodes}
        junk = {n for adjacent in neighbourhoods.values() for n in adjacent if self._is_junk(n)}
        if shared_identifiers(neighbourhoods, self.policy, junk):
            return None
        if new and _strongest(members, self.registry) != _strongest([*members, *new], self.registry):
            return None
        return person_id

    def _read(self, reads: _Reads, keys: set[IdKey], person_ids: set[str]) -> None:
        """Read into `reads`, in one round trip, the rows and links of `keys` and the members of `person_ids`.

        A junk identifier's links are not read: it links nothing, its neighbours list it among theirs,
        and a junk value seen everywhere has the largest partition of all.
        """
        unread = keys - reads.assignments.keys()
        linking = {k for k in unread if not self._is_junk(k)}
        read_assignments = self._assignments_async(unread)
        read_neighbours = self._neighbours_async(linking)
        read_members = self._members_async(person_ids - reads.members.keys(), reads)
        reads.assignments.update(read_assignments())
        reads.neighbours.update({k: set() for k in unread - linking})
        reads.neighbours.update(read_neighbours())
        read_members()

    def _is_junk(self, key: IdKey) -> bool:
        # Asked several times per identifier per call (each pattern a regex search): remembered per
        # policy and registry in force, and forgotten when either is replaced or the memo grows large.
        policy, registry = self.policy, self.registry
        if self._junk_memo_policy is not policy or self._junk_memo_registry is not registry \
                or len(self._junk_memo) > JUNK_MEMO_SIZE:
            self._junk_memo_policy, self._junk_memo_registry = policy, registry
            self._junk_memo = {}
        junk = self._junk_memo.get(key)
        if junk is None:
            identifier_type = registry.get(key.type)
            junk = self._junk_memo[key] = identifier_type is None or policy.is_junk(identifier_type, key.value)
        return junk

    def _shared_among(self, batch: Sequence[IdKey], component: _Component, junk: set[IdKey]) -> set[IdKey]:
        return set(shared_identifiers({k: component.neighbours[k] for k in batch}, self.policy, junk))

    def _plan(self, component: _Component, reason: str, reads: _Reads) -> _Plan:
        """The partition of a loaded component, and the writes and changes that make the stored rows match it."""
        result = partition(component.nodes, component.links(), self.registry, self.policy,
                           neighbours=component.neighbours, is_junk=self._is_junk)
        erased = reads.erased_persons
        group_ids, homes = self._assign_person_ids(result, component, erased)
        now = _now()
        new_person: dict[IdKey, str | None] = dict.fromkeys(result.junk)
        for group, person_id in zip(result.groups, group_ids, strict=True):
            new_person.update(dict.fromkeys(group, person_id))

        identifier_writes: list[tuple[str, Sequence[Any]]] = []
        member_writes: list[tuple[str, Sequence[Any]]] = []
        changed_persons: set[str] = set()
        for key in sorted(component.nodes):
            target = new_person.get(key)
            guard = "junk" if key in result.junk else "shared" if key in result.shared else None
            old = component.person_of.get(key)
            # An erased person is nobody's origin any more: its id is never given out again.
            origin = (component.origin_of.get(key) if component.origin_of.get(key) not in erased else None) or target
            if (target, origin, guard) != (old, component.origin_of.get(key), component.guard_of.get(key)):
                identifier_writes.append(("UPDATE identifiers SET person_id = ?, origin_person_id = ?, guard = ? "
                                          "WHERE id_type = ? AND id_value = ?", (target, origin, guard, key.type,
                                                                                 key.value)))
            if old != target:
                if old:
                    member_writes.append(("DELETE FROM person_identifiers WHERE person_id = ? AND id_type = ? "
                                          "AND id_value = ?", (old, key.type, key.value)))
                    changed_persons.add(old)
                if target:
                    member_writes.append(("INSERT INTO person_identifiers (person_id, id_type, id_value) "
                                          "VALUES (?, ?, ?)", (target, key.type, key.value)))
                    changed_persons.add(target)
        old_persons = {p for p in component.person_of.values() if p}
        members_by_old: dict[str, list[str]] = defaultdict(list)
        for key, old in component.person_of.items():
            if old and new_person.get(key):
                members_by_old[old].append(new_person[key] or "")
        merged_into: dict[str, str] = {}
        for old in sorted(old_persons - set(group_ids)):
            targets = members_by_old.get(old)
            if targets:
                # The survivor is where most of its identifiers went (ties: the oldest id).
                merged_into[old] = min(set(targets), key=lambda t: (-targets.count(t), t))
        redirects = self._redirects(group_ids, homes, live_before=old_persons, changed=changed_persons, reads=reads)
        return _Plan(
            reconciled=_Reconciled(result, group_ids, merged_into),
            person_writes=self._person_rows(group_ids, component, merged_into, members_by_old=members_by_old,
                                            changed=changed_persons, now=now, reads=reads, redirects=redirects)
            + member_writes,
            identifier_writes=identifier_writes,
            changes=_changes(old_persons, merged_into, members_by_old, reason))

    def _plan_attachment(self, component: _Component, with_person_columns: Set[str]) -> _Plan:
        """The new seeds of a component that attaches to one person (see _attaches_to) join that person."""
        person_id = component.attaches_to
        assert person_id is not None
        new = sorted(k for k in component.nodes if component.person_of.get(k) is None)
        return _Plan(
            reconciled=_Reconciled(Partition(groups=[frozenset(component.nodes)]), [person_id], {}),
            person_writes=_person_writes("UPDATE {table} SET merged_into = null, update_time = ? WHERE person_id = ?",
                                         (_now(), person_id), columns_with_members=person_id in with_person_columns)
            * bool(new)
            + [("INSERT INTO person_identifiers (person_id, id_type, id_value) VALUES (?, ?, ?)",
                (person_id, k.type, k.value)) for k in new],
            identifier_writes=[("UPDATE identifiers SET person_id = ?, origin_person_id = ?, guard = ? "
                                "WHERE id_type = ? AND id_value = ?", (person_id, person_id, None, k.type, k.value))
                               for k in new],
            changes=[])

    def _assign_person_ids(self, result: Partition, component: _Component, erased: Set[str]
                           ) -> tuple[list[str], dict[str, int]]:
        """Each group's person id, and each original person's home: the group holding most of the identifiers
        first given to it (erased persons have none)."""
        def rank(group: frozenset[IdKey]) -> tuple[int, IdKey]:
            best = _strongest(group, self.registry)
            assert best is not None  # groups are never empty
            return (-self._priority(best), best)

        order = sorted(range(len(result.groups)), key=lambda i: rank(result.groups[i]))
        position = {index: place for place, index in enumerate(order)}
        # Each existing id's home is the group holding most of the identifiers first given to it (ties: the
        # group ranked first). A group takes the oldest (smallest) id homed in it, so a merge keeps the
        # oldest person, and a split leaves an id with most of its identifiers: a group that took one of
        # another person's identifiers does not take that person's id.
        held: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for index, group in enumerate(result.groups):
            for key in group:
                origin = component.origin_of.get(key)
                if origin and origin not in erased:
                    held[origin][index] += 1
        home = {p: min(counts, key=lambda i: (-counts[i], position[i])) for p, counts in held.items()}
        taken: set[str] = set(erased)
        ids = [""] * len(result.groups)
        for index in order:
            group = result.groups[index]
            homed = {p for p, h in home.items() if h == index} - taken
            # Otherwise an id none of its identifiers came from (e.g. a survivor of an earlier merge), not
            # one homed in another group.
            current = {component.person_of.get(k) for k in group} - {None} - taken - home.keys()
            candidates = sorted(p for p in (homed or current) if p)
            ids[index] = candidates[0] if candidates else new_person_id()
            taken.add(ids[index])
        return ids, home

    def _priority(self, key: IdKey) -> int:
        identifier_type = self.registry.get(key.type)
        return identifier_type.priority if identifier_type else 0

    @staticmethod
    def _person_rows(group_ids: list[str], component: _Component, merged_into: dict[str, str], *,
                     members_by_old: Mapping[str, list[str]], changed: set[str], now: datetime,
                     reads: _Reads, redirects: Mapping[str, str]) -> list[tuple[str, Sequence[Any]]]:
        live = {p for p in component.person_of.values() if p}
        existing = live | {p for p in component.origin_of.values() if p}
        rows: list[tuple[str, Sequence[Any]]] = []

        def write(cql: str, params: Sequence[Any], person_id: str) -> None:
            rows.extend(_person_writes(cql, params, columns_with_members=person_id in reads.with_person_columns))

        for person_id in group_ids:
            # Same identifiers as before: nothing about the person changed. Unless its row redirects all the
            # same: a writer that re-pointed it (_redirects) while another, holding other identifiers first
            # given to it, restored it. Repaired here, by the next recomputation of its component.
            if person_id in live and person_id not in changed and person_id not in reads.merged_into:
                continue
            if person_id in existing:
                # Restores a person merged away before (a split), or keeps a live one live.
                write("UPDATE {table} SET merged_into = null, update_time = ? WHERE person_id = ?", (now, person_id),
                      person_id)
                if person_id not in live:
                    # A restored person no longer redirects: the persons it was merged into stop listing it.
                    # Those are where its members come from, and where its own row redirected (when its
                    # columns were read: a person merged away before 0004 keeps them in `persons` only).
                    # Persons whose layout was not read are not written, not to leave a partial row.
                    # Since merge chains are compressed (_redirects), its own row names the survivor at the end
                    # of its chain, and the person it was merged into is found by what lists it.
                    survivors = {old for old, targets in members_by_old.items() if person_id in targets}
                    survivors |= {reads.merged_into[person_id]} if person_id in reads.merged_into else set()
                    survivors |= {p for p, listed in reads.merged_from.items() if person_id in listed}
                    for survivor in sorted(survivors - {person_id}):
                        if survivor in reads.members:
                            write("UPDATE {table} SET merged_from = merged_from - ? WHERE person_id = ?",
                                  ({person_id}, survivor), survivor)
            else:
                # A new person: its columns live with its members only.
                rows.append(("INSERT INTO person_identifiers (person_id, create_time, update_time) VALUES (?, ?, ?)",
                             (person_id, now, now)))
        for loser, winner in merged_into.items():
            write("UPDATE {table} SET merged_into = ?, update_time = ? WHERE person_id = ?", (winner, now, loser),
                  loser)
            write("UPDATE {table} SET merged_from = merged_from + ? WHERE person_id = ?", ({loser}, winner), winner)
        for person_id, target in sorted(redirects.items()):
            write("UPDATE {table} SET merged_into = ?, update_time = ? WHERE person_id = ?", (target, now, person_id),
                  person_id)
        rows += IdentityGraph._listing_moves(group_ids, merged_into, redirects, reads)
        return rows

    @staticmethod
    def _redirects(group_ids: Sequence[str], homes: Mapping[str, int], *, live_before: Set[str], changed: Set[str],
                   reads: _Reads) -> dict[str, str]:
        """Persons merged away before this recomputation whose row must redirect elsewhere: id -> the person that
        now holds most of the identifiers first given to it (its home, see _assign_person_ids).

        Merge chains are compressed this way. When C was merged into B, then B is merged into A, C's
        identifiers (first given to C, now B's) go to A: C is re-pointed to A in the same write round as
        B's merge, so a lookup by C takes one hop, however many merges follow. Old chains (written before
        this) are compressed by the next recomputation of their component, and reads follow them meanwhile.
        A split re-points them too: C goes where its identifiers went (to B when the split gives B its id
        back with C's identifiers, where C -> B led before chains were compressed).

        `merged_from` keeps recording direct merges (A lists B, B lists C): split restores persons from
        identifiers' origins, not from it, and it says which ids were merged into which (_listing_moves).

        Only persons with identifiers in the component are re-pointed: those identifiers are held by
        persons whose leases this writer holds, so a writer restoring or re-pointing such a person
        concurrently would need one of them too. A person whose first identifiers were divided between
        components by an earlier split (one that did not give its id back) can still be restored by a writer
        of the other component meanwhile; the live person left redirecting is repaired by the next
        recomputation of its component (_person_rows). A person merged into B whose identifiers are all
        elsewhere keeps redirecting to B, which reads follow (get_persons).

        A person stored before 0004 keeps its columns in `persons`, which recomputations do not read: its
        redirect is written whenever the person it goes to changes, whether or not it went there already.
        """
        live_after = set(group_ids)
        redirects = {}
        for person_id, home in homes.items():  # erased persons have none: they redirect nowhere
            if person_id in live_before or person_id in live_after:
                continue  # live, restored, or merged away now (merged_into)
            target = group_ids[home]
            if person_id in reads.with_person_columns:
                if reads.merged_into.get(person_id) != target:
                    redirects[person_id] = target
            elif target in changed:
                redirects[person_id] = target
        return redirects

    @staticmethod
    def _listing_moves(group_ids: Sequence[str], merged_into: Mapping[str, str], redirects: Mapping[str, str],
                       reads: _Reads) -> list[tuple[str, Sequence[Any]]]:
        """Keep every person merged away listed (merged_from) where its redirect leads, as far as read.

        A person listed by one that ends where it redirects (that person itself, or one merged away into
        it) stays listed there: the listing records the merge that made it redirect. One listed only by
        others, such as C listed by B after a split restored B but left C's identifiers with A (C still
        redirects to A), moves from the live persons listing it to the person it redirects to:
        Person.merged_person_ids says which ids redirect to a person, and erasing a person marks erased
        every id listed under it. Listings are read from static columns: a person stored before 0004 keeps
        its own in `persons`, and is not written here.
        """
        live_after = set(group_ids)

        def ends_at(person_id: str) -> str | None:
            if person_id in live_after:
                return person_id
            if person_id in merged_into or person_id in redirects:
                return merged_into.get(person_id) or redirects[person_id]
            return reads.merged_into.get(person_id) if person_id in reads.with_person_columns else None

        listers_of: dict[str, set[str]] = defaultdict(set)
        for lister, listed in reads.merged_from.items():
            for person_id in listed:
                listers_of[person_id].add(lister)
        candidates = set(redirects) | {x for p in live_after & reads.merged_from.keys() for x in reads.merged_from[p]}
        rows: list[tuple[str, Sequence[Any]]] = []
        for person_id in sorted(candidates - live_after):
            target = ends_at(person_id)
            listed_by = listers_of.get(person_id, set())
            if target not in live_after or not listed_by or any(ends_at(p) == target for p in listed_by):
                continue
            for former in sorted(listed_by & live_after):
                rows += _person_writes("UPDATE {table} SET merged_from = merged_from - ? WHERE person_id = ?",
                                       ({person_id}, former), columns_with_members=former in reads.with_person_columns)
            rows += _person_writes("UPDATE {table} SET merged_from = merged_from + ? WHERE person_id = ?",
                                   ({person_id}, target), columns_with_members=target in reads.with_person_columns)
        return rows

    # ---- erasure tombstones ----------------------------------------------------------------------

    def _salt(self) -> bytes:
        if self._tombstone_salt is None:
            # One random salt per deployment, created once (compare-and-set) and shared by every process.
            self._session.execute("INSERT INTO settings (name, document) VALUES (?, ?) IF NOT EXISTS",
                                  ("erasure_salt", secrets.token_hex(32)))
            row = self._session.execute("SELECT document FROM settings WHERE name = ?", ("erasure_salt",),
                                        consistency=SERIAL_CONSISTENCY).one()
            self._tombstone_salt = bytes.fromhex(row.document)
        return self._tombstone_salt

    def tombstone_hash(self, key: IdKey) -> str:
        return hashlib.sha256(self._salt() + f"{key.type}\x00{key.value}".encode()).hexdigest()

    def tombstoned(self, keys: set[IdKey]) -> set[IdKey]:
        return self._tombstones_async(keys)()

    def delete_tombstone(self, key: IdKey) -> None:
        digest = self.tombstone_hash(key)
        if self._session.execute("SELECT erase_time FROM erasure_tombstones WHERE identifier_hash = ?",
                                 (digest,)).one() is None:
            raise NotFound(f"{key.type} {key.value!r} has no erasure tombstone", reason="TOMBSTONE_NOT_FOUND")
        self._session.execute("DELETE FROM erasure_tombstones WHERE identifier_hash = ?", (digest,))

    # ---- retracting evidence ----------------------------------------------------------------------

    def unlink_pair(self, a: IdKey, b: IdKey, reason: str) -> Retraction:
        """Retract every observed link between `a` and `b`, then recompute their component."""
        if self._session.execute(
                "SELECT message_id FROM links WHERE id_type = ? AND id_value = ? AND other_type = ? "
                "AND other_value = ? LIMIT 1", (a.type, a.value, b.type, b.value)).one() is None:
            raise NotFound(f"{a} and {b} were never observed together", reason="LINK_NOT_FOUND")
        self._delete_pair_links([(a, b), (b, a)])
        return self._recompute_after_retraction({a, b}, reason or f"unlink {a} - {b}")

    def unlink_message(self, message_id: str, reason: str) -> Retraction:
        """Retract every link one observation made; replaying that observation stays a no-op."""
        row = self._session.execute("SELECT identifiers, retracted FROM observations WHERE message_id = ?",
                                    (message_id,)).one()
        if row is None or row.retracted:
            raise NotFound(f"no linked observation with message_id {message_id!r} (never seen, retracted or erased)",
                           reason="OBSERVATION_NOT_FOUND")
        keys = [IdKey(t, v) for t, v in row.identifiers]
        if len(keys) > 1 and not self._links_remain(keys, message_id):
            # An unlink of a pair or identifier retracted every link it made already: nothing to retract.
            raise NotFound(f"the links of observation {message_id!r} were all retracted already (by an unlink of "
                           "a pair or identifier); nothing is left to retract", reason="OBSERVATION_NOT_FOUND")
        self._session.execute_many(
            "DELETE FROM links WHERE id_type = ? AND id_value = ? AND other_type = ? AND other_value = ? "
            "AND message_id = ?",
            [(a.type, a.value, b.type, b.value, message_id) for a in keys for b in keys if a != b])
        self._session.execute_many(
            "DELETE FROM identifier_sightings WHERE id_type = ? AND id_value = ? AND message_id = ?",
            [(k.type, k.value, message_id) for k in keys])
        self._session.execute("UPDATE observations SET retracted = true WHERE message_id = ?", (message_id,))
        return self._recompute_after_retraction(set(keys), reason or f"unlink observation {message_id}")

    def _links_remain(self, keys: Sequence[IdKey], message_id: str) -> bool:
        """Whether any link observation `message_id` made between `keys` is still in the edge log."""
        futures = [self._session.execute_async(
            "SELECT message_id FROM links WHERE id_type = ? AND id_value = ? AND other_type = ? AND other_value = ? "
            "AND message_id = ?", (a.type, a.value, b.type, b.value, message_id))
            for i, a in enumerate(keys) for b in keys[i + 1:]]
        return any(self._session.result(future).one() is not None for future in futures)

    def unlink_identifier(self, key: IdKey, reason: str) -> Retraction:
        """Detach an identifier from everything it was linked with."""
        others = self.neighbours_of(key)
        if not others:
            person_id = self.persons_of([key])[key]
            # A junk identifier is never given a person, but it was seen: linked with nothing now, not unknown.
            if person_id is None and self._session.execute(
                    "SELECT message_id FROM identifier_sightings WHERE id_type = ? AND id_value = ? LIMIT 1",
                    (key.type, key.value)).one() is None:
                raise NotFound(f"no identifier {key}", reason="IDENTIFIER_NOT_FOUND")
            if person_id is None or self.person_members(person_id) == [key]:
                raise NotFound(f"{key} is linked with nothing (unlinked already, or only ever seen alone); "
                               "nothing is left to retract", reason="LINK_NOT_FOUND")
        self._delete_pair_links([(o, key) for o in others])
        self._session.execute("DELETE FROM links WHERE id_type = ? AND id_value = ?", (key.type, key.value))
        return self._recompute_after_retraction({key, *others}, reason or f"unlink identifier {key}")

    def neighbours_of(self, key: IdKey) -> set[IdKey]:
        return {IdKey(r.other_type, r.other_value) for r in self._session.iterate(
            "SELECT other_type, other_value FROM links WHERE id_type = ? AND id_value = ?", (key.type, key.value))}

    def _delete_pair_links(self, pairs: Sequence[tuple[IdKey, IdKey]]) -> None:
        self._session.execute_many(
            "DELETE FROM links WHERE id_type = ? AND id_value = ? AND other_type = ? AND other_value = ?",
            [(a.type, a.value, b.type, b.value) for a, b in pairs])

    def _recompute_after_retraction(self, seeds: set[IdKey], reason: str) -> Retraction:
        reconciled = self.reconcile(seeds, reason)
        group_of = reconciled.partition.group_of()
        person_ids = sorted({reconciled.group_ids[group_of[k]] for k in seeds if k in group_of})
        splits = [c for c in reconciled.changes if c.change_type == ChangeType.SPLIT]
        return Retraction(person_ids, splits[0] if splits else None, list(reconciled.changes))

    # ---- erasure ---------------------------------------------------------------------------------

    def erase(self, person_id: str, *, allow_relink: bool, reason: str,
              committed: Callable[[Erasure], None] | None = None) -> Erasure:
        """Delete a person's identifiers, links and provenance; tombstone the identifiers unless allowed.

        `committed` is called with the erasure once it is done, before the erased identifiers' neighbours are
        recomputed (a tidy-up that may take until the call's deadline): the server remembers the call's
        request_id there, so that a retry after a deadline passed in the tidy-up learns of the erasure."""
        person = self.get_person(person_id)
        owner, leased, members = self._lease_person(person.person_id)
        merged_ids: set[str] = set()
        try:
            now = _now()
            if not allow_relink:
                # Tombstones first, under the leases of the person and of each identifier: an observation
                # that checked before this point recomputes under one of those leases after it, and
                # then finds the tombstone (see _reconcile_held).
                self._session.execute_many(
                    "INSERT INTO erasure_tombstones (identifier_hash, erase_time) VALUES (?, ?)",
                    [(self.tombstone_hash(k), now) for k in members])
            reads = [(self._session.execute_async(
                          "SELECT other_type, other_value FROM links WHERE id_type = ? AND id_value = ?",
                          (k.type, k.value)),
                      self._session.execute_async(
                          "SELECT message_id FROM identifier_sightings WHERE id_type = ? AND id_value = ?",
                          (k.type, k.value))) for k in members]
            member_set = set(members)
            outside: set[IdKey] = set()
            link_count = 0
            message_ids: set[str] = set()
            deletes: list[tuple[str, Sequence[Any]]] = []
            for key, (links_future, sightings_future) in zip(members, reads, strict=True):
                # Both may span pages (an identifier seen in thousands of messages): rows_of translates their errors.
                others = {IdKey(r.other_type, r.other_value)
                          for r in self._session.rows_of(self._session.result(links_future))}
                message_ids |= {r.message_id for r in self._session.rows_of(self._session.result(sightings_future))}
                link_count += len(others)
                outside |= others - member_set
                deletes += [("DELETE FROM links WHERE id_type = ? AND id_value = ? AND other_type = ? "
                             "AND other_value = ?", (o.type, o.value, key.type, key.value)) for o in others]
                deletes += [(f"DELETE FROM {table} WHERE id_type = ? AND id_value = ?", (key.type, key.value))
                            for table in ("links", "identifier_sightings", "identifiers")]
            deletes += [("DELETE FROM observations WHERE message_id = ?", (m,)) for m in message_ids]
            deletes.append(("DELETE FROM person_identifiers WHERE person_id = ?", (person.person_id,)))
            self._session.write_all(deletes)
            # After the deletes (a later timestamp). The person's columns to `persons`: the members'
            # partition was deleted whole, statics too, and a person without a static create_time is read
            # from `persons`. A static `erased` (and nothing else) to the members' partition of the person
            # and of every id merged into it: recomputations read it there with the members, for an
            # identifier outside the person may still name one of those ids as its origin, and an erased
            # id is never given out again.
            merged_ids = self._merged_ids(person)
            self._session.write_all([("UPDATE persons SET erased = true, merged_into = null, update_time = ? "
                                      "WHERE person_id = ?", (now, person.person_id))]
                                    + [("UPDATE person_identifiers SET erased = true WHERE person_id = ?", (erased,))
                                       for erased in sorted({person.person_id} | merged_ids)])
            change = feed.record(self._session, ChangeType.ERASE, [person.person_id], [],
                                 reason or "erased by a privacy request")
        finally:
            # Every id merged into the person (as far as read) and whatever its identifiers were last found in.
            self._recent.forget([person.person_id, *person.merged_person_ids, *merged_ids], members)
            self._leases.release(leased, owner)
        # Committed: what follows only tidies up, and must not fail the erasure (a retry would find the
        # person gone, NOT_FOUND, and never learn that it was erased).
        erasure = Erasure(person.person_id, len(members), link_count, change)
        if committed is not None:
            committed(erasure)
        self._reconcile_neighbours(outside, f"neighbours of erased person {person.person_id}")
        return erasure

    def _reconcile_neighbours(self, outside: set[IdKey], reason: str) -> None:
        """Recompute the components of identifiers that were linked to erased ones, each around its own
        identifier: they may now count fewer neighbours (a device no longer shared), but were not one
        component (a shared device's thousands of accounts are as many persons). Those that cannot be
        recomputed now (contended, or a component too large) are logged and left to the next evidence
        that touches them, as a policy change leaves persons to be judged again."""
        ordered = sorted(outside)
        # A call without a deadline still ends: a shared device's tens of thousands of neighbours are left to
        # their next evidence rather than holding the caller for many lease waits.
        stop_at = time.monotonic() + NEIGHBOUR_RECHECK_SECONDS
        for start in range(0, len(ordered), NEIGHBOUR_SEEDS_PER_ROUND):
            left = deadline.remaining()
            if (left is not None and left < 2 * DEADLINE_MARGIN_SECONDS) or time.monotonic() > stop_at:
                # The caller must still learn that its erasure is done.
                log.warning("%s: %d identifiers left to be recomputed when next touched: the call's deadline is "
                            "near, or the re-check's own time is up", reason, len(ordered) - start)
                return
            chunk = ordered[start:start + NEIGHBOUR_SEEDS_PER_ROUND]
            try:
                self.reconcile_many([{key} for key in chunk], [reason] * len(chunk))
            except DomainError as error:
                log.warning("%s: %d identifiers left to be recomputed when next touched: %s", reason, len(chunk),
                            error.message)
            except Exception:
                log.exception("%s: %d identifiers left to be recomputed when next touched", reason, len(chunk))

    def _merged_ids(self, person: Person) -> set[str]:
        """Every id merged into `person`, directly or through ids merged into those.

        merged_from records direct merges (see IdentityGraph._redirects), so this reads one level of
        them per round trip, down to the end: an id left out would not be marked erased, and could be
        given out again. Each round reads only ids not seen before, so it ends.
        """
        found: set[str] = set()
        frontier = set(person.merged_person_ids)
        while True:
            frontier -= found | {person.person_id}
            if not frontier:
                break
            found |= frontier
            rows = {r.person_id: r for r in self._session.select_in(
                "SELECT person_id, merged_from, create_time FROM person_identifiers WHERE person_id IN ?", (),
                sorted(frontier)).rows() if r.create_time is not None}
            earlier = sorted(frontier - rows.keys())
            if earlier:
                rows.update({r.person_id: r for r in self._session.select_in(
                    "SELECT person_id, merged_from FROM persons WHERE person_id IN ?", (), earlier).rows()})
            frontier = {merged for r in rows.values() for merged in r.merged_from or ()}
        return found

    def _lease_person(self, person_id: str) -> tuple[str, set[str], list[IdKey]]:
        """Leases on a person and on each of its identifiers: (owner, leases, the identifiers under them)."""
        give_up = time.monotonic() + min(LEASE_WAIT_SECONDS, deadline.remaining() or LEASE_WAIT_SECONDS)
        attempt = 0
        while True:
            members = self.person_members(person_id)
            keys = {f"p:{person_id}"} | {_lease_key(k, None) for k in members}
            owner = uuid.uuid4().hex
            if self._leases.acquire_all(keys, owner):
                current = self.person_members(person_id)
                if set(current) <= set(members):
                    return owner, keys, current
                self._leases.release(keys, owner)  # it gained identifiers meanwhile: lease those too
            attempt += 1
            if time.monotonic() > give_up:
                raise Unavailable("the person is being changed by another writer; retry the call",
                                  reason="COMPONENT_CONTENDED")
            time.sleep(min(0.5, 0.005 * 2 ** min(attempt, 7)) * random.uniform(0.5, 1.5))

    # ---- idempotent requests ---------------------------------------------------------------------

    def recall_request(self, request_id: str, fingerprint: str) -> str | None:
        """The stored result of an already applied request id, if any; AlreadyExists when the id was applied
        to another request (`fingerprint`: the method and the request without its request_id, see
        remember_request). A result stored without a fingerprint (before they were kept) counts as matching."""
        if not request_id:
            return None
        row = self._session.execute("SELECT result FROM applied_requests WHERE request_id = ?", (request_id,)).one()
        if row is None:
            return None
        stored_fingerprint, separator, result = str(row.result).rpartition(_FINGERPRINT_SEPARATOR)
        if separator and stored_fingerprint != fingerprint:
            raise AlreadyExists(
                f"request_id {request_id!r} was already used for a different request (another method, target or "
                "fields); a request_id makes retries of one request idempotent: send a new request_id for a new "
                "request", reason="REQUEST_ID_REUSED", metadata={"request_id": request_id})
        return result

    def remember_request(self, request_id: str, fingerprint: str, result: str) -> None:
        """Remember `result` (hex digits) under `request_id` with the request's fingerprint, so that a retry
        gets it back and a reuse of the id for another request is refused."""
        if request_id:
            self._session.execute("INSERT INTO applied_requests (request_id, result, applied_at) VALUES (?, ?, ?)",
                                  (request_id, f"{fingerprint}{_FINGERPRINT_SEPARATOR}{result}", _now()))

    # ---- reading ----------------------------------------------------------------------------------

    def person_members(self, person_id: str) -> list[IdKey]:
        if not person_id:
            return []
        return [IdKey(r.id_type, r.id_value) for r in self._session.iterate(
            "SELECT id_type, id_value FROM person_identifiers WHERE person_id = ?", (person_id,))
            if r.id_type is not None]  # a partition holding only the person's static columns

    def link_provenance(self, a: IdKey, b: IdKey) -> list[Provenance]:
        return [Provenance(r.message_id, r.source or "", r.source_kind or 0, _utc(r.event_time))
                for r in self._session.execute(
                    "SELECT message_id, source, source_kind, event_time FROM links WHERE id_type = ? AND id_value = ? "
                    "AND other_type = ? AND other_value = ? LIMIT 100", (a.type, a.value, b.type, b.value))]

    def identifier_details(self, keys: Sequence[IdKey]) -> list[IdentifierDetails]:
        """First/last seen, observation count and guard of each identifier, in the order given."""
        futures = [(self._session.execute_async(
                        "SELECT min(event_time) AS first_seen, max(event_time) AS last_seen, count(*) AS sightings "
                        "FROM identifier_sightings WHERE id_type = ? AND id_value = ?", (k.type, k.value)),
                    self._session.execute_async("SELECT guard FROM identifiers WHERE id_type = ? AND id_value = ?",
                                                (k.type, k.value))) for k in keys]
        details = []
        for key, (sightings_future, identifier_future) in zip(keys, futures, strict=True):
            sightings = self._session.result(sightings_future).one()
            identifier = self._session.result(identifier_future).one()
            stored_guard: str = (identifier.guard if identifier else None) or ""
            guard = {"junk": GuardKind.BLOCKED_VALUE, "shared": GuardKind.SHARED_IDENTIFIER}.get(stored_guard)
            details.append(IdentifierDetails(key, _utc(sightings.first_seen), _utc(sightings.last_seen),
                                             int(sightings.sightings or 0), guard))
        return details

    def persons_of(self, keys: Iterable[IdKey]) -> dict[IdKey, str | None]:
        return {k: a.person_id for k, a in self._assignments_async(keys)().items()}

    def lookup(self, keys: Iterable[IdKey], person_ids: Iterable[str] = (), max_staleness: float = 0.0
               ) -> tuple[dict[IdKey, Person | None], dict[str, Person]]:
        """The person each identifier (normalized) belongs to (None where nobody holds it, or its person is
        erased), and the persons `person_ids` name (as get_persons finds them), in at most two round trips.

        Identifiers looked up before are answered in one, through their holder hints (see RecentLookups);
        the others, and those whose hint is stale, in two: `identifiers`, then the persons. The hinted and
        the named persons are read while `identifiers` is read for the others. With `max_staleness`
        (seconds, at most recent.MAX_STALENESS_SECONDS), what was read that recently is not read again.
        """
        holding, named = self._holding(keys, person_ids, max_staleness)
        return {key: person for key, (_, person) in holding.items()}, named

    def person_of_identifier(self, key: IdKey, max_staleness: float = 0.0) -> Person:
        """The person an identifier (normalized) belongs to; NotFound saying why when none does."""
        holder, person = self._holding([key], (), max_staleness)[0][key]
        if person is not None:
            return person
        if holder:
            raise NotFound(f"no person {holder!r} (never issued, or erased)", reason="PERSON_NOT_FOUND")
        raise self._not_held(key)

    def _holding(self, keys: Iterable[IdKey], person_ids: Iterable[str] = (), max_staleness: float = 0.0
                 ) -> tuple[dict[IdKey, tuple[str | None, Person | None]], dict[str, Person]]:
        """Each identifier's holder as `identifiers` names it (or as its valid hint does), and that person;
        and the persons `person_ids` name. Those read within `max_staleness` seconds are not read again."""
        reading = self._recent.begin()
        wanted = set(keys)
        named_ids = set(person_ids)
        found: dict[IdKey, tuple[str | None, Person | None]] = {}
        named: dict[str, Person] = {}
        if max_staleness > 0:
            for selected, answer in self._recent.answers([*wanted, *named_ids], max_staleness).items():
                if isinstance(selected, str):
                    named[selected] = answer
                else:
                    found[selected] = (answer.person_id, answer)
            wanted -= found.keys()
            named_ids -= named.keys()
        hinted = self._recent.hints(wanted)
        read_holders = self._assignments_async(wanted - hinted.keys()) if len(hinted) < len(wanted) else None
        read: dict[IdKey, tuple[str | None, Person | None]] = {}
        read_named: dict[str, Person] = {}
        if hinted or named_ids:
            persons = self.get_persons({*hinted.values(), *named_ids}, read_time=reading.read_time)
            read_named = {p: persons[p] for p in named_ids if p in persons}
            for key, person_id in hinted.items():
                person = persons.get(person_id)
                if person is not None and key in person.identifiers:
                    # As a lookup through `identifiers` answers it: the person holding it, not a redirect.
                    read[key] = (person.person_id, replace(person, redirected_from=""))
        holders = {k: a.person_id for k, a in read_holders().items()} if read_holders is not None else {}
        stale = hinted.keys() - read.keys()
        if stale:
            self._recent.forget_hints(stale)
            holders.update(self.persons_of(stale))
        persons = self.get_persons((p for p in holders.values() if p), read_time=reading.read_time)
        for key, holder in holders.items():
            read[key] = (holder, persons.get(holder) if holder else None)
        answers: dict[Selected, Person] = {key: person for key, (_, person) in read.items()
                                           if person is not None and key in person.identifiers}
        answers.update(read_named)
        self._recent.remember(reading, answers)
        found.update(read)
        named.update(read_named)
        return found, named

    def normalize_one(self, type_name: str, value: str, field_path: str) -> IdKey:
        """One identifier normalized; InvalidArgument naming `field_path`.type or .value otherwise."""
        try:
            return IdKey(type_name, self.registry.normalize(type_name, value))
        except InvalidIdentifierValue as error:
            field_name = "type" if self.registry.get(type_name) is None else "value"
            raise InvalidArgument.for_field(f"{field_path}.{field_name}", str(error),
                                            reason="INVALID_IDENTIFIER") from error

    def person_holding(self, key: IdKey) -> str:
        """The person an identifier (normalized) belongs to; NotFound when none does."""
        person_id = self.persons_of([key])[key]
        if not person_id:
            raise self._not_held(key)
        return person_id

    def _not_held(self, key: IdKey) -> NotFound:
        if self._is_junk(key):
            return NotFound(f"no person holds {key.type} {key.value!r}: the value is blocked by the guard policy "
                            "as junk, so it never links to a person; look the person up by another identifier",
                            reason="PERSON_NOT_FOUND", metadata={"identifier_type": key.type, "guard": "BLOCKED_VALUE"})
        return NotFound(f"no person holds {key.type} {key.value!r}", reason="PERSON_NOT_FOUND",
                        metadata={"identifier_type": key.type})

    def get_person(self, person_id: str, max_staleness: float = 0.0) -> Person:
        """The person, following merge redirects to the survivor (read within `max_staleness` seconds)."""
        person = self._holding((), [person_id], max_staleness)[1].get(person_id)
        if person is None:
            raise NotFound(f"no person {person_id!r} (never issued, or erased)", reason="PERSON_NOT_FOUND")
        return person

    def get_persons(self, person_ids: Iterable[str], *, read_time: datetime | None = None) -> dict[str, Person]:
        """Each person found, by the id asked for, following merge redirects to the survivor.

        Each answer's read_time is `read_time` (when the caller's reads began), or the time of this call.
        Ids never issued, or erased, are absent. Every hop reads the members of all the ids it follows,
        with the person's own columns (static columns, schema 0004), in one request: one round trip
        when there is no redirect. Persons without them (created before 0004, or erased) are read
        from `persons` in a second one. A hop that reads nothing still follows the redirects of rows
        read before: when a batch names every id of a chain (C merged into B, B into A), the first
        read has them all, and C must still reach A through B.

        Merges write every redirect to the survivor itself (IdentityGraph._redirects), but chains written
        before that can be longer, and every chain is followed to its end: answering a person met on the
        way would answer one merged away, with identifiers it no longer holds. A chain without a cycle
        ends within as many hops as it has ids, each hop is one round trip for all the ids asked for,
        and every read is bounded by the caller's deadline. A cycle (a merge or split of these persons
        written half way: A's row already redirecting to B and B's still to A) has no survivor to
        answer: Unavailable, which a retry answers once the writer has finished (one that died is
        finished by the retry of its call, or by the next recomputation of the component).
        """
        read_time = read_time or _now()
        current = {p: p for p in set(person_ids) if p}
        rows: dict[str, Any] = {}
        members: dict[str, list[IdKey]] = {}
        visited = {p: {p} for p in current}
        while True:
            unread = set(current.values()) - rows.keys()
            if unread:
                self._read_person_rows(unread, rows, members)
            following = {p: (row.merged_into if (row := rows[c]) is not None and row.merged_into else c)
                         for p, c in current.items()}
            if following == current:
                break
            for requested, person_id in following.items():
                if person_id != current[requested]:
                    if person_id in visited[requested]:
                        raise Unavailable(
                            f"person {requested!r} redirects in a cycle through {sorted(visited[requested])}: a merge "
                            "or split of these persons is being written; retry the call",
                            reason="PERSON_REDIRECT_CYCLE", metadata={"person_id": requested})
                    visited[requested].add(person_id)
            current = following
        found = {}
        for requested, person_id in current.items():
            row = rows.get(person_id)
            if row is None or row.erased:
                continue
            found[requested] = Person(person_id=person_id, identifiers=members.get(person_id, []),
                                      merged_person_ids=sorted(row.merged_from or ()),
                                      redirected_from=requested if requested != person_id else "",
                                      create_time=row.create_time, update_time=row.update_time,
                                      read_time=read_time)
        return found

    def _read_person_rows(self, person_ids: set[str], rows: dict[str, Any], members: dict[str, list[IdKey]]) -> None:
        """Adds each person's own columns to `rows` (None when there are none: never issued) and its members
        to `members`, read from person_identifiers, and from `persons` for persons without them there."""
        read = self._session.select_in(f"SELECT {_PERSON_COLUMNS}, id_type, id_value FROM person_identifiers "
                                       "WHERE person_id IN ?", (), sorted(person_ids))
        rows.update(dict.fromkeys(person_ids))
        for row in read.rows():
            found_members = members.setdefault(row.person_id, [])
            if row.id_type is not None:  # else a partition holding only the person's static columns
                found_members.append(IdKey(row.id_type, row.id_value))
            if row.create_time is not None:
                rows[row.person_id] = row
        earlier = sorted(p for p in person_ids if rows[p] is None)
        if earlier:
            read = self._session.select_in(f"SELECT {_PERSON_COLUMNS} FROM persons WHERE person_id IN ?", (),
                                           earlier)
            rows.update({row.person_id: row for row in read.rows()})


def _strongest(keys: Iterable[IdKey], registry: IdentifierRegistry) -> IdKey | None:
    """The highest-priority identifier (ties: the smallest key): it names the person of an observation."""
    def rank(key: IdKey) -> tuple[int, IdKey]:
        identifier_type = registry.get(key.type)
        return (-(identifier_type.priority if identifier_type else 0), key)
    return min(keys, key=rank, default=None)


def _describe_outcome(outcome: LinkOutcome, reconciled: _Reconciled, registry: IdentifierRegistry) -> None:
    group_of = reconciled.partition.group_of()
    ids_by_key = {k: reconciled.group_ids[group_of[k]] for k in outcome.normalized if k in group_of}
    outcome.person_ids = sorted(set(ids_by_key.values()))
    outcome.changes = list(reconciled.changes)
    for key in outcome.normalized:
        if key in reconciled.erased:
            outcome.guard_decisions.append(_erased_decision(key))
        elif key in reconciled.partition.junk:
            outcome.guard_decisions.append(GuardDecision(key, GuardKind.BLOCKED_VALUE,
                                                         f"{key.type} value {key.value!r} is a blocked junk value"))
        elif key in reconciled.partition.shared:
            outcome.guard_decisions.append(GuardDecision(key, GuardKind.SHARED_IDENTIFIER,
                                                         reconciled.partition.shared[key]))
    keys = set(outcome.normalized)
    for blocked in reconciled.partition.blocked_links:
        if blocked.a in keys and blocked.b in keys:
            outcome.guard_decisions.append(GuardDecision(
                blocked.a, GuardKind.TYPE_LIMIT,
                f"linking {blocked.a} and {blocked.b} would give a person more than {blocked.limit} "
                f"{blocked.limited_type}"))
    unshared = [k for k in outcome.normalized if k in ids_by_key and k not in reconciled.partition.shared]
    best = _strongest(unshared or list(ids_by_key), registry)
    outcome.person_id = ids_by_key[best] if best else ""
    outcome.merged_person_ids = sorted(p for p, w in reconciled.merged_into.items() if w == outcome.person_id)


def _describe_unchanged(outcome: LinkOutcome, persons: Mapping[IdKey, str | None],
                        registry: IdentifierRegistry) -> None:
    """The outcome of an observation that changed nothing (a replay): the persons its identifiers hold."""
    outcome.person_ids = sorted({p for k in outcome.normalized if (p := persons.get(k))})
    best = _strongest([k for k in outcome.normalized if persons.get(k)], registry)
    outcome.person_id = (persons[best] or "") if best else ""


def _group_by_shared_identifiers(observations: Sequence[list[IdKey]]) -> list[list[int]]:
    """Indexes of observations grouped so that observations sharing an identifier are together."""
    parent = list(range(len(observations)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[IdKey, int] = {}
    for index, keys in enumerate(observations):
        for key in keys:
            if key in owner:
                parent[find(index)] = find(owner[key])
            else:
                owner[key] = index
    groups: dict[int, list[int]] = defaultdict(list)
    for index in range(len(observations)):
        groups[find(index)].append(index)
    return list(groups.values())
