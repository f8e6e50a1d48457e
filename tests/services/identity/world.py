"""A synthetic identity world with known truth, for order-independence and accuracy tests and benchmarks.

Persons have several devices and cookies, an app account and sometimes a CRM id, email and phone, and
WeChat ids; households of 4-5 share a tablet (so it is seen with more accounts than the shared rule
allows); some observations carry junk ids. Every identifier has a true owner, except the shared tablets
and the junk ids (owner None).
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

# Stored as normalized, so that the ids the service returns compare equal.
JUNK = ("device_id:00000000-0000-0000-0000-000000000000", "cookie:undefined", "account_id:null", "cookie:anonymous")


@dataclass
class World:
    observations: list[tuple[str, list[str]]] = field(default_factory=list)  # (message_id, ["type:value", ...])
    owner: dict[str, int | None] = field(default_factory=dict)

    def uniquely_owned(self) -> set[str]:
        return {identifier for identifier, owner in self.owner.items() if owner is not None}


def build_world(persons: int, seed: int = 1) -> World:
    rng = random.Random(seed)
    world = World()
    message_ids = itertools.count()

    def observe(*identifiers: str) -> None:
        world.observations.append((f"w{seed}-{next(message_ids)}", list(identifiers)))

    for person in range(persons):
        def own(identifier: str, person: int = person) -> str:
            world.owner[identifier] = person
            return identifier

        account = own(f"account_id:acct-{person}")
        devices = [own(f"device_id:DEV-{person}-{d}") for d in range(rng.randint(1, 3))]
        cookies = [own(f"cookie:ck-{person}-{c}") for c in range(rng.randint(1, 4))]
        email = own(f"email:user{person}@example.com") if rng.random() < 0.8 else None
        phone = own(f"phone:+86138{person:08d}") if rng.random() < 0.7 else None
        for device in devices:
            observe(device, account)
        for cookie in cookies:
            observe(cookie, rng.choice(devices))
        cookie = rng.choice(cookies)
        observe(cookie, account)
        if email:
            observe(account, email)
        if phone:
            observe(account, phone) if rng.random() < 0.5 else observe(email or account, phone)
        if rng.random() < 0.3:
            observe(own(f"crm_id:crm-{person}"), email or account)
        if rng.random() < 0.4:
            openid, unionid = own(f"wechat_openid:oid-{person}"), own(f"wechat_unionid:uid-{person}")
            observe(openid, unionid)
            observe(unionid, phone or account)
        if rng.random() < 0.03:
            observe(rng.choice(JUNK), account)
    # Households share a tablet: seen with every member's account, it belongs to nobody.
    household_members = list(range(persons))
    rng.shuffle(household_members)
    for number, start in enumerate(range(0, persons // 10 * 10 // 2, 5)):
        tablet = f"device_id:TABLET-{number}"
        world.owner[tablet] = None
        for member in household_members[start:start + rng.randint(4, 5)]:
            observe(tablet, f"account_id:acct-{member}")
    for junk in JUNK:
        world.owner[junk] = None
    return world


@dataclass(frozen=True)
class Accuracy:
    precision: float
    recall: float
    best_reachable_recall: float
    unowned_merged: int


def _pairs(n: int) -> int:
    return n * (n - 1) // 2


def accuracy(world: World, predicted: dict[str, str]) -> Accuracy:
    """Pairwise precision/recall over uniquely owned identifiers; `predicted` maps identifier -> person id."""
    owned = world.uniquely_owned()
    clusters: dict[str, list[str]] = defaultdict(list)
    for identifier in owned:
        if identifier in predicted:
            clusters[predicted[identifier]].append(identifier)
    true_positive = sum(_pairs(n) for members in clusters.values()
                        for n in _count_by(world.owner[m] for m in members).values())
    predicted_pairs = sum(_pairs(len(members)) for members in clusters.values())
    true_pairs = sum(_pairs(n) for n in _count_by(world.owner[i] for i in owned).values())
    reachable = _reachable_true_pairs(world, owned)
    # Unowned = shared or junk: such an identifier must not sit in a person with anything else.
    sizes = _count_by(predicted.values())
    unowned_merged = sum(1 for i, o in world.owner.items() if o is None and i in predicted and sizes[predicted[i]] > 1)
    return Accuracy(precision=true_positive / predicted_pairs if predicted_pairs else 1.0,
                    recall=true_positive / true_pairs, best_reachable_recall=reachable / true_pairs,
                    unowned_merged=unowned_merged)


def _count_by(values: Iterable[object]) -> dict[object, int]:
    counts: dict[object, int] = defaultdict(int)
    for value in values:
        counts[value] += 1
    return counts


def _reachable_true_pairs(world: World, owned: set[str]) -> int:
    """True pairs connected through evidence among uniquely owned identifiers (what any linker can reach)."""
    parent = {i: i for i in owned}

    def find(i: str) -> str:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for _, identifiers in world.observations:
        kept = [i for i in identifiers if i in owned]
        for a, b in itertools.pairwise(kept):
            parent[find(a)] = find(b)
    components: dict[str, list[str]] = defaultdict(list)
    for identifier in owned:
        components[find(identifier)].append(identifier)
    return sum(_pairs(n) for members in components.values()
               for n in _count_by(world.owner[m] for m in members).values())
