"""The identity graph on Cassandra: link, look up, and keep persons equal to the partition of the evidence.

Writes follow one protocol, whatever the operation:

1. The evidence is appended to the edge log (`links`, both directions) with plain idempotent writes.
2. The affected component is loaded: every identifier reachable through links that can merge (not
   through junk or shared identifiers) plus every member of every person touched, so that a person
   that must be split is seen whole.
3. Leases (lightweight transactions) are taken on every person id of the component and on every
   unassigned identifier in it, in sorted order; the component is then loaded again, and if it
   grew beyond the leases taken the round starts over. Two writers whose evidence meets always
   share a lease, so their recomputations are serialized, and the later one sees both edges.
4. The partition of the component is computed (services.identity.partition) and person ids are
   assigned deterministically: a group keeps the oldest free person id among its identifiers'
   original persons (so merges converge on the oldest person and splits restore the merged ids).
5. The derived rows are written and the change is recorded in the feed; the leases are released.

A writer that dies half way leaves derived rows that the next recomputation of the component
overwrites from the edge log; its leases expire after 30 s.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

from cassandra.cluster import ResponseFuture

from services.identity import feed
from services.identity.feed import Change, ChangeType
from services.identity.identifiers import GuardPolicy, IdentifierRegistry, InvalidIdentifierValue
from services.identity.leases import Leases
from services.identity.partition import IdKey, Partition, partition, shared_identifiers
from shared import deadline
from shared.cassandra import SERIAL_CONSISTENCY, CassandraSession
from shared.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable, Violations

MAX_OBSERVATIONS_PER_CALL = 1000
MAX_IDENTIFIERS_PER_OBSERVATION = 32
MAX_COMPONENT_IDENTIFIERS = 20_000
LEASE_WAIT_SECONDS = 60.0
REDIRECT_HOPS = 16


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


@dataclass(frozen=True)
class Provenance:
    message_id: str
    source: str
    source_kind: int
    event_time: datetime | None


@dataclass(frozen=True)
class Retraction:
    person_ids: list[str]
    change: Change | None


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


@dataclass(frozen=True)
class Person:
    person_id: str
    identifiers: list[IdKey]
    merged_person_ids: list[str]
    redirected_from: str
    create_time: datetime | None
    update_time: datetime | None


@dataclass
class _Component:
    nodes: set[IdKey] = field(default_factory=set)
    neighbours: dict[IdKey, set[IdKey]] = field(default_factory=dict)
    person_of: dict[IdKey, str | None] = field(default_factory=dict)
    origin_of: dict[IdKey, str | None] = field(default_factory=dict)
    guard_of: dict[IdKey, str | None] = field(default_factory=dict)
    junk: set[IdKey] = field(default_factory=set)

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


def _lease_key(key: IdKey, person_id: str | None) -> str:
    """The lease guarding an identifier: its person's, or its own while it has no person."""
    return f"p:{person_id}" if person_id else f"i:{key}"


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


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime | None) -> datetime | None:
    # The driver returns naive datetimes in UTC.
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class IdentityGraph:
    def __init__(self, session: CassandraSession, registry: IdentifierRegistry | None = None,
                 policy: GuardPolicy | None = None, *, workers: int = 32) -> None:
        self._session = session
        self.registry = registry or IdentifierRegistry()
        self.policy = policy or GuardPolicy()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="identity-reconcile")
        self._leases = Leases(session)
        self._tombstone_salt: bytes | None = None

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # ---- validation -------------------------------------------------------------------------------

    def normalize_observations(self, observations: Sequence[RawObservation]) -> list[list[IdKey]]:
        """Every observation's identifiers normalized; InvalidArgument naming every bad field otherwise."""
        if len(observations) > MAX_OBSERVATIONS_PER_CALL:
            raise ResourceExhausted(f"{len(observations)} observations in one call; at most "
                                    f"{MAX_OBSERVATIONS_PER_CALL} are allowed, split the batch",
                                    reason="BATCH_TOO_LARGE")
        violations = Violations()
        violations.check(bool(observations), "observations", "at least one observation is required")
        normalized: list[list[IdKey]] = []
        for i, observation in enumerate(observations):
            path = f"observations[{i}]"
            message_id = observation.evidence.message_id
            violations.check(0 < len(message_id) <= 128, f"{path}.provenance.message_id",
                             "required, 1-128 characters")
            violations.check(0 < len(observation.identifiers) <= MAX_IDENTIFIERS_PER_OBSERVATION,
                             f"{path}.identifiers", f"1-{MAX_IDENTIFIERS_PER_OBSERVATION} identifiers required")
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
        """Apply observations in order; one outcome per observation."""
        normalized = self.normalize_observations(observations)
        outcomes = [LinkOutcome(normalized=keys) for keys in normalized]
        # Both checks are reads of independent rows: issue them together, wait once.
        tombstone_reads = self._start_tombstone_reads({k for keys in normalized for k in keys})
        known = self._known_observations([o.evidence.message_id for o in observations])
        erased = self._tombstoned_from(tombstone_reads)
        if erased:
            # Identifiers of erased persons are not linked again: a late or replayed event must not
            # bring back what a privacy request removed.
            for index, keys in enumerate(normalized):
                for key in keys:
                    if key in erased:
                        outcomes[index].guard_decisions.append(_erased_decision(key))
                normalized[index] = [k for k in keys if k not in erased]
        pending: list[int] = []
        for index, observation in enumerate(observations):
            if observation.evidence.message_id in known:
                outcomes[index].duplicate = True
            else:
                pending.append(index)
        # Observations in one call that share identifiers are reconciled together, in one component.
        seed_groups = _group_by_shared_identifiers([normalized[i] for i in pending])
        self._append_evidence([(normalized[i], observations[i].evidence) for i in pending])
        seed_groups = [g for g in seed_groups if any(normalized[pending[i]] for i in g)]
        reconciled_groups = self.reconcile_many(
            [{k for g in group for k in normalized[pending[g]]} for group in seed_groups],
            [f"observation {observations[pending[group[0]]].evidence.message_id}" for group in seed_groups])
        results: dict[int, _Reconciled] = {}
        for group, reconciled in zip(seed_groups, reconciled_groups, strict=True):
            for g in group:
                results[pending[g]] = reconciled
        self._record_observations([(normalized[i], observations[i].evidence) for i in pending])
        for index, outcome in enumerate(outcomes):
            if index in results:
                _describe_outcome(outcome, results[index], self.registry)
            else:
                self._describe_duplicate(outcome)
        return outcomes

    def _known_observations(self, message_ids: Iterable[str]) -> set[str]:
        futures = {m: self._session.execute_async("SELECT message_id FROM observations WHERE message_id = ?", (m,))
                   for m in set(message_ids)}
        return {m for m, f in futures.items() if self._session.result(f).one() is not None}

    def _append_evidence(self, items: Sequence[tuple[list[IdKey], Evidence]]) -> None:
        recorded = _now()
        rows = []
        sightings = []
        for keys, evidence in items:
            event_time = evidence.event_time or recorded
            for a in keys:
                sightings.append((a.type, a.value, evidence.message_id, event_time))
                for b in keys:
                    if a != b:
                        rows.append((a.type, a.value, b.type, b.value, evidence.message_id, evidence.source,
                                     evidence.source_kind, event_time, recorded))
        self._session.execute_many(
            "INSERT INTO links (id_type, id_value, other_type, other_value, message_id, source, source_kind, "
            "event_time, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        self._session.execute_many(
            "INSERT INTO identifier_sightings (id_type, id_value, message_id, event_time) VALUES (?, ?, ?, ?)",
            sightings)

    def _record_observations(self, items: Sequence[tuple[list[IdKey], Evidence]]) -> None:
        recorded = _now()
        self._session.execute_many(
            "INSERT INTO observations (message_id, identifiers, source, source_kind, event_time, recorded_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(e.message_id, [(k.type, k.value) for k in keys], e.source, e.source_kind, e.event_time or recorded,
              recorded) for keys, e in items])

    def _describe_duplicate(self, outcome: LinkOutcome) -> None:
        persons = self.persons_of(outcome.normalized)
        ids = sorted({p for p in persons.values() if p})
        outcome.person_ids = ids
        best = _strongest([k for k in outcome.normalized if persons.get(k)], self.registry)
        outcome.person_id = (persons[best] or "") if best else ""

    # ---- reconciliation ---------------------------------------------------------------------------

    def reconcile(self, seeds: set[IdKey], reason: str = "") -> _Reconciled:
        """Recompute the persons of the component around `seeds` under leases (see the module doc)."""
        return self.reconcile_many([seeds], [reason])[0]

    def reconcile_many(self, seed_sets: Sequence[set[IdKey]], reasons: Sequence[str]) -> list[_Reconciled]:
        """Recompute the components around each seed set under leases; one result per seed set.

        Leases are taken for many components at once (few lightweight transactions, see leases.py).
        Seed sets whose lease keys overlap are recomputed together as one component. A component
        found to reach beyond the leases taken for it is tried again with the leases it now needs.
        When every lease is free (the common case) all components run and their leases are given
        back together at the end; when some are held by other writers, the waiting components are
        retried on a short tick, and the leases of components that finished are given back on each
        tick, so that writers contending for the same persons interleave instead of queueing whole
        calls behind each other.
        """
        give_up = time.monotonic() + min(LEASE_WAIT_SECONDS, deadline.remaining() or LEASE_WAIT_SECONDS)
        results: dict[int, _Reconciled] = {}
        needed = self._seed_lease_keys(seed_sets)
        waiting = set(range(len(seed_sets)))
        running: dict[Future[_Reconciled | set[str]], tuple[list[int], dict[str, str]]] = {}
        finished_holding: dict[str, str] = {}  # leases of finished components, given back together
        attempt = 0
        try:
            while waiting or running:
                if waiting:
                    self._start_ready(seed_sets, reasons, needed, waiting, running)
                    if waiting:
                        attempt += 1
                        if time.monotonic() > give_up:
                            raise Unavailable("the identity component is busy with other writers; retry the call",
                                              reason="COMPONENT_CONTENDED",
                                              metadata={"components_waiting": str(len(waiting))})
                # Woken when a component of ours finishes or a lease comes back in this process; leases
                # of other processes are polled for, with backoff.
                pause = min(0.2, 0.005 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1.5) if waiting else None
                self._leases.wait({k for i in waiting for k in needed[i]}, pause,
                                  unless=lambda: any(future.done() for future in running))
                for future in [f for f in running if f.done()]:
                    cluster, owners = running.pop(future)
                    finished_holding.update(owners)
                    outcome = future.result()
                    for index in cluster:
                        if isinstance(outcome, _Reconciled):
                            results[index] = outcome
                        else:
                            needed[index] = outcome
                            waiting.add(index)
                # Leases of finished components go back together at the end, unless someone waits for
                # them, or this call itself contends (then writers interleave rather than queue).
                if finished_holding and (waiting or not running or self._leases.wanted(finished_holding)):
                    self._leases.release_held(finished_holding)
                    finished_holding = {}
        finally:
            if running:
                # Failing: every recomputation still running finishes before its leases are given back.
                futures_wait(list(running))
                finished_holding.update({k: o for _, owners in running.values() for k, o in owners.items()})
            self._leases.release_held(finished_holding)
        return [results[i] for i in range(len(seed_sets))]

    def _start_ready(self, seed_sets: Sequence[set[IdKey]], reasons: Sequence[str], needed: list[set[str]],
                     waiting: set[int],
                     running: dict[Future[_Reconciled | set[str]], tuple[list[int], dict[str, str]]]) -> None:
        """Take the leases of every waiting component that can have them now, and start recomputing those."""
        clusters = _overlapping(sorted(waiting), needed)
        key_sets = [set().union(*(needed[i] for i in cluster)) for cluster in clusters]
        owner = uuid.uuid4().hex
        held = self._leases.acquire_groups(key_sets, owner)
        for cluster, keys, ok in zip(clusters, key_sets, held, strict=True):
            if ok:
                waiting.difference_update(cluster)
                future = self._pool.submit(self._reconcile_held, deadline.remaining(),
                                           set().union(*(seed_sets[i] for i in cluster)), keys, reasons[cluster[0]])
                future.add_done_callback(lambda _: self._leases.notify())
                running[future] = (cluster, dict.fromkeys(keys, owner))

    def _seed_lease_keys(self, seed_sets: Sequence[set[IdKey]]) -> list[set[str]]:
        """The leases each seed set needs as far as its seeds' own rows tell (the component may need more)."""
        persons = self.persons_of({k for seeds in seed_sets for k in seeds})
        return [{_lease_key(k, persons[k]) for k in seeds if persons[k] or not self._is_junk(k)} for seeds in seed_sets]

    def _reconcile_held(self, seconds: float | None, seeds: set[IdKey], held: set[str],
                        reason: str) -> _Reconciled | set[str]:
        """Under the leases `held`: the recomputed component, or the leases it needs when it reaches further."""
        with deadline.deadline_after(seconds):
            component = self._load_component(seeds)
            # An erasure may have tombstoned a seed after this call checked it and before these leases
            # were taken (erase holds the leases of what it tombstones): drop the evidence just appended.
            # Erasure deletes the identifier rows it tombstones, so only seeds without a person can be erased.
            erased = self.tombstoned({k for k in seeds if not component.person_of.get(k)})
            if erased:
                self._drop_erased_evidence(erased, seeds)
                seeds = seeds - erased
                component = self._load_component(seeds)
            needed = component.lease_keys()
            if not needed <= held:
                return needed
            reconciled = self._rewrite(component, reason)
            reconciled.erased = erased
            return reconciled

    def _drop_erased_evidence(self, erased: set[IdKey], seeds: set[IdKey]) -> None:
        self._delete_pair_links([(a, b) for a in erased for b in seeds if a != b]
                                + [(b, a) for a in erased for b in seeds if a != b and b not in erased])
        self._session.execute_many("DELETE FROM links WHERE id_type = ? AND id_value = ?",
                                   [(k.type, k.value) for k in erased])
        self._session.execute_many("DELETE FROM identifier_sightings WHERE id_type = ? AND id_value = ?",
                                   [(k.type, k.value) for k in erased])

    def _load_component(self, seeds: Iterable[IdKey]) -> _Component:
        component = _Component()
        frontier = set(seeds)
        loaded_persons: set[str] = set()
        while frontier:
            batch = sorted(frontier - component.nodes)
            frontier = set()
            if len(component.nodes) + len(batch) > MAX_COMPONENT_IDENTIFIERS:
                raise ResourceExhausted(
                    f"the component around these identifiers exceeds {MAX_COMPONENT_IDENTIFIERS} identifiers; a "
                    "junk or shared identifier is probably missing from the guard policy", reason="COMPONENT_TOO_LARGE")
            rows = [(self._session.execute_async(
                        "SELECT person_id, origin_person_id, guard FROM identifiers WHERE id_type = ? AND id_value = ?",
                        (k.type, k.value)),
                     self._session.execute_async(
                        "SELECT other_type, other_value FROM links WHERE id_type = ? AND id_value = ?",
                        (k.type, k.value))) for k in batch]
            for key, (identifier_future, links_future) in zip(batch, rows, strict=True):
                identifier = self._session.result(identifier_future).one()
                component.nodes.add(key)
                component.person_of[key] = identifier.person_id if identifier else None
                component.origin_of[key] = identifier.origin_person_id if identifier else None
                component.guard_of[key] = identifier.guard if identifier else None
                component.neighbours[key] = {IdKey(r.other_type, r.other_value)
                                             for r in self._session.result(links_future)}
            junk = {k for k in batch if self._is_junk(k)}
            component.junk |= junk
            shared = self._shared_among(batch, component, junk)
            for key in batch:
                if key in junk or key in shared:
                    continue
                frontier.update(n for n in component.neighbours[key] if not self._is_junk(n))
            # Origin persons too: a group may only take back its original person id if that person is
            # not still held by others, and that is only known when the origin's members are loaded.
            new_persons = ({component.person_of[k] for k in batch} | {component.origin_of[k] for k in batch}
                           ) - loaded_persons - {None}
            for person_id in sorted(p for p in new_persons if p):
                loaded_persons.add(person_id)
                frontier.update(self.person_members(person_id))
            frontier -= component.nodes
        return component

    def _is_junk(self, key: IdKey) -> bool:
        identifier_type = self.registry.get(key.type)
        return identifier_type is None or self.policy.is_junk(identifier_type, key.value)

    def _shared_among(self, batch: Sequence[IdKey], component: _Component, junk: set[IdKey]) -> set[IdKey]:
        return set(shared_identifiers({k: component.neighbours[k] for k in batch}, self.policy, junk))

    def _rewrite(self, component: _Component, reason: str) -> _Reconciled:
        result = partition(component.nodes, component.links(), self.registry, self.policy,
                           neighbours=component.neighbours)
        group_ids = self._assign_person_ids(result, component)
        now = _now()
        new_person: dict[IdKey, str | None] = dict.fromkeys(result.junk)
        for group, person_id in zip(result.groups, group_ids, strict=True):
            new_person.update(dict.fromkeys(group, person_id))

        identifier_rows, add_members, remove_members = [], [], []
        changed_persons: set[str] = set()
        for key in sorted(component.nodes):
            target = new_person.get(key)
            guard = "junk" if key in result.junk else "shared" if key in result.shared else None
            old = component.person_of.get(key)
            origin = component.origin_of.get(key) or target
            if (target, origin, guard) != (old, component.origin_of.get(key), component.guard_of.get(key)):
                identifier_rows.append((target, origin, guard, key.type, key.value))
            if old != target:
                if old:
                    remove_members.append((old, key.type, key.value))
                    changed_persons.add(old)
                if target:
                    add_members.append((target, key.type, key.value))
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
        # Identifier rows last: a writer that dies half way leaves them unchanged where anything else
        # was left undone, so the next recomputation sees those identifiers as changed and redoes it.
        self._run_concurrently(
            self._person_rows(group_ids, component, merged_into, changed_persons, now)
            + [("INSERT INTO person_identifiers (person_id, id_type, id_value) VALUES (?, ?, ?)", row)
               for row in add_members]
            + [("DELETE FROM person_identifiers WHERE person_id = ? AND id_type = ? AND id_value = ?", row)
               for row in remove_members])
        self._run_concurrently(
            [("UPDATE identifiers SET person_id = ?, origin_person_id = ?, guard = ? "
              "WHERE id_type = ? AND id_value = ?", row) for row in identifier_rows])
        changes = self._record_changes(old_persons, merged_into, members_by_old, reason)
        return _Reconciled(result, group_ids, merged_into, changes)

    def _run_concurrently(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        futures = [self._session.execute_async(cql, params) for cql, params in statements]
        for future in futures:
            self._session.result(future)

    def _assign_person_ids(self, result: Partition, component: _Component) -> list[str]:
        def rank(group: frozenset[IdKey]) -> tuple[int, IdKey]:
            best = _strongest(group, self.registry)
            assert best is not None  # groups are never empty
            return (-self._priority(best), best)

        order = sorted(range(len(result.groups)), key=lambda i: rank(result.groups[i]))
        taken: set[str] = set()
        ids = [""] * len(result.groups)
        for index in order:
            group = result.groups[index]
            origins = {component.origin_of.get(k) for k in group} - {None} - taken
            current = {component.person_of.get(k) for k in group} - {None} - taken
            candidates = sorted(p for p in (origins or current) if p)
            ids[index] = candidates[0] if candidates else new_person_id()
            taken.add(ids[index])
        return ids

    def _priority(self, key: IdKey) -> int:
        identifier_type = self.registry.get(key.type)
        return identifier_type.priority if identifier_type else 0

    @staticmethod
    def _person_rows(group_ids: list[str], component: _Component, merged_into: dict[str, str],
                     changed: set[str], now: datetime) -> list[tuple[str, tuple[Any, ...]]]:
        live = {p for p in component.person_of.values() if p}
        existing = live | {p for p in component.origin_of.values() if p}
        rows: list[tuple[str, tuple[Any, ...]]] = []
        for person_id in group_ids:
            if person_id in live and person_id not in changed:
                continue  # same identifiers as before: nothing about the person changed
            if person_id in existing:
                # Restores a person merged away before (a split), or keeps a live one live.
                rows.append(("UPDATE persons SET merged_into = null, update_time = ? WHERE person_id = ?",
                             (now, person_id)))
            else:
                rows.append(("INSERT INTO persons (person_id, create_time, update_time) VALUES (?, ?, ?)",
                             (person_id, now, now)))
        for loser, winner in merged_into.items():
            rows.append(("UPDATE persons SET merged_into = ?, update_time = ? WHERE person_id = ?",
                         (winner, now, loser)))
            rows.append(("UPDATE persons SET merged_from = merged_from + ? WHERE person_id = ?", ({loser}, winner)))
        return rows

    def _record_changes(self, old_persons: set[str], merged_into: dict[str, str],
                        members_by_old: dict[str, list[str]], reason: str) -> list[Change]:
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
                changes.append((ChangeType.SPLIT, [old], ordered,
                                reason or "split: guards recomputed from the edge log"))
        return [feed.record(self._session, *change) for change in changes]

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
        return self._tombstoned_from(self._start_tombstone_reads(keys))

    def _start_tombstone_reads(self, keys: set[IdKey]) -> dict[IdKey, ResponseFuture]:
        return {k: self._session.execute_async("SELECT erase_time FROM erasure_tombstones WHERE identifier_hash = ?",
                                               (self.tombstone_hash(k),)) for k in keys}

    def _tombstoned_from(self, reads: dict[IdKey, ResponseFuture]) -> set[IdKey]:
        return {k for k, f in reads.items() if self._session.result(f).one() is not None}

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
        self._session.execute_many(
            "DELETE FROM links WHERE id_type = ? AND id_value = ? AND other_type = ? AND other_value = ? "
            "AND message_id = ?",
            [(a.type, a.value, b.type, b.value, message_id) for a in keys for b in keys if a != b])
        self._session.execute_many(
            "DELETE FROM identifier_sightings WHERE id_type = ? AND id_value = ? AND message_id = ?",
            [(k.type, k.value, message_id) for k in keys])
        self._session.execute("UPDATE observations SET retracted = true WHERE message_id = ?", (message_id,))
        return self._recompute_after_retraction(set(keys), reason or f"unlink observation {message_id}")

    def unlink_identifier(self, key: IdKey, reason: str) -> Retraction:
        """Detach an identifier from everything it was linked with."""
        others = self.neighbours_of(key)
        if not others and self.persons_of([key])[key] is None:
            raise NotFound(f"no identifier {key}", reason="IDENTIFIER_NOT_FOUND")
        self._delete_pair_links([(o, key) for o in others])
        self._session.execute("DELETE FROM links WHERE id_type = ? AND id_value = ?", (key.type, key.value))
        return self._recompute_after_retraction({key, *others}, reason or f"unlink identifier {key}")

    def neighbours_of(self, key: IdKey) -> set[IdKey]:
        return {IdKey(r.other_type, r.other_value) for r in self._session.execute(
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
        return Retraction(person_ids, splits[0] if splits else None)

    # ---- erasure ---------------------------------------------------------------------------------

    def erase(self, person_id: str, *, allow_relink: bool, reason: str) -> Erasure:
        """Delete a person's identifiers, links and provenance; tombstone the identifiers unless allowed."""
        person = self.get_person(person_id)
        owner, leased, members = self._lease_person(person.person_id)
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
                others = {IdKey(r.other_type, r.other_value) for r in self._session.result(links_future)}
                message_ids |= {r.message_id for r in self._session.result(sightings_future)}
                link_count += len(others)
                outside |= others - member_set
                deletes += [("DELETE FROM links WHERE id_type = ? AND id_value = ? AND other_type = ? "
                             "AND other_value = ?", (o.type, o.value, key.type, key.value)) for o in others]
                deletes += [(f"DELETE FROM {table} WHERE id_type = ? AND id_value = ?", (key.type, key.value))
                            for table in ("links", "identifier_sightings", "identifiers")]
            deletes += [("DELETE FROM observations WHERE message_id = ?", (m,)) for m in message_ids]
            deletes.append(("DELETE FROM person_identifiers WHERE person_id = ?", (person.person_id,)))
            self._run_concurrently(deletes)
            self._session.execute("UPDATE persons SET erased = true, merged_into = null, update_time = ? "
                                  "WHERE person_id = ?", (now, person.person_id))
            change = feed.record(self._session, ChangeType.ERASE, [person.person_id], [],
                                 reason or "erased by a privacy request")
        finally:
            self._leases.release(leased, owner)
        if outside:
            # Identifiers that were linked to the erased ones may now count fewer neighbours (a device
            # no longer shared): recompute them from what evidence remains.
            self.reconcile(outside, f"neighbours of erased person {person.person_id}")
        return Erasure(person.person_id, len(members), link_count, change)

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

    def recall_request(self, request_id: str) -> str | None:
        """The stored result of an already applied request id, if any."""
        if not request_id:
            return None
        row = self._session.execute("SELECT result FROM applied_requests WHERE request_id = ?", (request_id,)).one()
        return row.result if row else None

    def remember_request(self, request_id: str, result: str) -> None:
        if request_id:
            self._session.execute("INSERT INTO applied_requests (request_id, result, applied_at) VALUES (?, ?, ?)",
                                  (request_id, result, _now()))

    # ---- reading ----------------------------------------------------------------------------------

    def person_members(self, person_id: str) -> list[IdKey]:
        if not person_id:
            return []
        return [IdKey(r.id_type, r.id_value) for r in self._session.execute(
            "SELECT id_type, id_value FROM person_identifiers WHERE person_id = ?", (person_id,))]

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
        futures = {k: self._session.execute_async(
            "SELECT person_id FROM identifiers WHERE id_type = ? AND id_value = ?", (k.type, k.value)) for k in keys}
        result: dict[IdKey, str | None] = {}
        for key, future in futures.items():
            row = self._session.result(future).one()
            result[key] = row.person_id if row else None
        return result

    def normalize_one(self, type_name: str, value: str, field_path: str) -> IdKey:
        """One identifier normalized; InvalidArgument naming `field_path`.type or .value otherwise."""
        try:
            return IdKey(type_name, self.registry.normalize(type_name, value))
        except InvalidIdentifierValue as error:
            field_name = "type" if self.registry.get(type_name) is None else "value"
            raise InvalidArgument.for_field(f"{field_path}.{field_name}", str(error),
                                            reason="INVALID_IDENTIFIER") from error

    def person_of_identifier(self, type_name: str, value: str, field_path: str = "identifier") -> str:
        key = self.normalize_one(type_name, value, field_path)
        person_id = self.persons_of([key])[key]
        if not person_id:
            raise NotFound(f"no person holds {key.type} {value!r}", reason="PERSON_NOT_FOUND",
                           metadata={"identifier_type": key.type})
        return person_id

    def get_person(self, person_id: str) -> Person:
        """The person, following merge redirects to the survivor."""
        requested, current = person_id, person_id
        row: Any = None
        for _ in range(REDIRECT_HOPS):
            # The members are read alongside the person row: one round trip when there is no redirect.
            members_future = self._session.execute_async(
                "SELECT id_type, id_value FROM person_identifiers WHERE person_id = ?", (current,))
            row = self._session.execute(
                "SELECT person_id, merged_into, merged_from, erased, create_time, update_time FROM persons "
                "WHERE person_id = ?", (current,)).one()
            members_rows = self._session.result(members_future)
            if row is None or row.erased:
                raise NotFound(f"no person {person_id!r} (never issued, or erased)", reason="PERSON_NOT_FOUND")
            if not row.merged_into:
                break
            current = row.merged_into
        members = [IdKey(r.id_type, r.id_value) for r in members_rows]
        return Person(person_id=current, identifiers=members, merged_person_ids=sorted(row.merged_from or ()),
                      redirected_from=requested if requested != current else "",
                      create_time=row.create_time, update_time=row.update_time)


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
