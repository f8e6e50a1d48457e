"""The person partition as a pure function of the evidence set.

Given every identifier and every observed link, decide which identifiers are one person. The
result depends only on the *set* of evidence, never on the order it arrived in, because each
guard is a property of the set:

1. **Junk** identifiers (blocklisted values) link nothing.
2. **Shared** identifiers (e.g. a device seen with more distinct accounts than a rule allows) are
   counted over their whole neighbourhood; they keep their links as evidence but merge nothing.
3. The remaining links are united in one canonical order (strongest identifier types first, then
   by key), skipping any union that would give a person more values of a type than the type
   allows (e.g. two account ids). Because the order is canonical, so is the outcome.

Storage calls this on one merge component at a time: components of the graph without junk and
shared identifiers are independent, so the restriction of the global partition to a component is
the partition of that component alone.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from services.identity.identifiers import GuardPolicy, IdentifierRegistry, IdentifierType


class IdKey(NamedTuple):
    """A normalized identifier.

    A named tuple rather than a frozen dataclass: a link call hashes, compares and sorts keys
    hundreds of thousands of times, and tuples do that in C (a dataclass's __hash__, __eq__ and
    __lt__ are Python functions, about 7% of a link call's CPU).
    """

    type: str
    value: str

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


@dataclass(frozen=True)
class BlockedLink:
    a: IdKey
    b: IdKey
    limited_type: str
    limit: int


@dataclass
class Partition:
    """The persons (groups of identifiers) and every guard decision taken on the way."""

    groups: list[frozenset[IdKey]] = field(default_factory=list)
    junk: set[IdKey] = field(default_factory=set)
    shared: dict[IdKey, str] = field(default_factory=dict)  # identifier -> why it is shared
    blocked_links: list[BlockedLink] = field(default_factory=list)

    def group_of(self) -> dict[IdKey, int]:
        return {member: index for index, group in enumerate(self.groups) for member in group}


def _type_of(registry: IdentifierRegistry, key: IdKey) -> IdentifierType:
    identifier_type = registry.get(key.type)
    if identifier_type is None:
        raise KeyError(f"unknown identifier type {key.type!r}")
    return identifier_type


def shared_identifiers(neighbours: Mapping[IdKey, Iterable[IdKey]], policy: GuardPolicy,
                       junk: set[IdKey]) -> dict[IdKey, str]:
    """Identifiers seen with more distinct identifiers of a counted type than a rule allows."""
    shared: dict[IdKey, str] = {}
    for node, adjacent in neighbours.items():
        if node in junk:
            continue
        for (shared_type, counted_type), limit in policy.shared_identifier_limits.items():
            if node.type != shared_type:
                continue
            distinct = {n for n in adjacent if n.type == counted_type and n not in junk}
            if len(distinct) > limit:
                shared[node] = f"{node.type} seen with {len(distinct)} distinct {counted_type} (limit {limit})"
                break
    return shared


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[IdKey, IdKey] = {}
        # root -> identifier type -> values of that type in the component (only for limited types)
        self.limited: dict[IdKey, dict[str, set[IdKey]]] = {}

    def add(self, node: IdKey, limited: bool) -> None:
        if node not in self.parent:
            self.parent[node] = node
            self.limited[node] = {node.type: {node}} if limited else {}

    def find(self, node: IdKey) -> IdKey:
        root = node
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[node] != root:  # path compression
            self.parent[node], node = root, self.parent[node]
        return root


def partition(nodes: Iterable[IdKey], links: Iterable[tuple[IdKey, IdKey]], registry: IdentifierRegistry,
              policy: GuardPolicy, *, neighbours: Mapping[IdKey, Iterable[IdKey]] | None = None,
              is_junk: Callable[[IdKey], bool] | None = None) -> Partition:
    """Partition `nodes` into persons using `links` (pairs observed together).

    `neighbours` may give a shared-candidate's full neighbourhood when `links` covers only one
    component; by default the neighbourhood is taken from `links`. `is_junk` may answer
    `policy.is_junk` for an identifier of a registered type, e.g. from a memo (the graph asks it for
    every identifier it loads, and a policy's patterns are regular expression searches).
    """
    all_nodes = set(nodes)
    unique_links = {(a, b) if a <= b else (b, a) for a, b in links if a != b}
    for a, b in unique_links:
        all_nodes.update((a, b))
    result = Partition()
    if is_junk is None:
        result.junk = {n for n in all_nodes if policy.is_junk(_type_of(registry, n), n.value)}
    else:
        for node in all_nodes:
            _type_of(registry, node)  # an unknown type is an error either way
        result.junk = {n for n in all_nodes if is_junk(n)}
    if neighbours is None:
        adjacency: dict[IdKey, set[IdKey]] = defaultdict(set)
        for a, b in unique_links:
            adjacency[a].add(b)
            adjacency[b].add(a)
        neighbours = adjacency
    result.shared = shared_identifiers(neighbours, policy, result.junk)
    excluded = result.junk | result.shared.keys()

    union_find = _UnionFind()
    for node in sorted(all_nodes - excluded):
        union_find.add(node, _type_of(registry, node).max_per_person > 0)

    def strength(link: tuple[IdKey, IdKey]) -> tuple[int, int, IdKey, IdKey]:
        pa, pb = _type_of(registry, link[0]).priority, _type_of(registry, link[1]).priority
        return (-max(pa, pb), -min(pa, pb), link[0], link[1])

    for a, b in sorted((link for link in unique_links if not set(link) & excluded), key=strength):
        root_a, root_b = union_find.find(a), union_find.find(b)
        if root_a == root_b:
            continue
        conflict = _limit_conflict(union_find.limited[root_a], union_find.limited[root_b], registry)
        if conflict is not None:
            result.blocked_links.append(BlockedLink(a, b, *conflict))
            continue
        # Deterministic root: the smaller key, so the structure itself never depends on arrival order.
        winner, loser = (root_a, root_b) if root_a < root_b else (root_b, root_a)
        union_find.parent[loser] = winner
        for type_name, values in union_find.limited.pop(loser).items():
            union_find.limited[winner].setdefault(type_name, set()).update(values)

    members: dict[IdKey, set[IdKey]] = defaultdict(set)
    for node in union_find.parent:
        members[union_find.find(node)].add(node)
    # Shared identifiers stand alone: a person of their own, holding nobody else's identifiers.
    groups = [frozenset(group) for group in members.values()] + [frozenset({node}) for node in result.shared]
    result.groups = sorted(groups, key=min)
    return result


def _limit_conflict(left: Mapping[str, set[IdKey]], right: Mapping[str, set[IdKey]],
                    registry: IdentifierRegistry) -> tuple[str, int] | None:
    for type_name in left.keys() & right.keys():
        limit = _type_of(registry, IdKey(type_name, "")).max_per_person
        if len(left[type_name] | right[type_name]) > limit:
            return type_name, limit
    return None


def fingerprint(groups: Iterable[Iterable[IdKey]]) -> str:
    """A canonical digest of a partition: equal partitions, equal fingerprints, whatever the person ids."""
    canonical = sorted(sorted(str(member) for member in group) for group in groups)
    return hashlib.sha256(repr(canonical).encode()).hexdigest()
