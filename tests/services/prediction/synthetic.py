"""A synthetic shop with known behaviour: each person buys at their own rate until they go silent for good.

Buying propensity is hidden in the data only through past behaviour, so a model that learns from
features must rank persons better than chance, and a broken label or feature pipeline cannot.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from services.prediction.history import ORDER_EVENT, ActivityEvent, InMemoryProfileSource

START = datetime(2023, 1, 1, tzinfo=UTC)
END = datetime(2025, 1, 1, tzinfo=UTC)


def day(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def synthetic_events(persons: int, seed: int = 7) -> dict[str, list[ActivityEvent]]:
    rng = random.Random(seed)
    events: dict[str, list[ActivityEvent]] = {}
    span_days = (END - START).days
    for number in range(persons):
        person_events = []
        first = START + timedelta(days=rng.uniform(0, span_days * 0.6))
        # Orders per day while alive (mean ~one a month) and a lifetime after which the person is gone.
        rate = rng.gammavariate(1.5, 1 / 45)
        silent_at = first + timedelta(days=rng.expovariate(1 / 300))
        time = first
        person_events.append(ActivityEvent("page_view", first, None, "home"))
        while True:
            time += timedelta(days=rng.expovariate(rate))
            if time >= min(silent_at, END):
                break
            person_events.append(ActivityEvent(ORDER_EVENT, time, round(rng.lognormvariate(3.5, 0.6), 2),
                                               rng.choice(["books", "music", "games"])))
            if rng.random() < 0.5:
                person_events.append(ActivityEvent("page_view", time - timedelta(hours=1), None, "product"))
        events[f"p{number:05d}"] = sorted(person_events, key=lambda e: e.time)
    return events


def synthetic_source(persons: int, seed: int = 7) -> InMemoryProfileSource:
    return InMemoryProfileSource(synthetic_events(persons, seed))
