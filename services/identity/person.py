"""A person as a lookup answers it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from services.identity.partition import IdKey


@dataclass(frozen=True)
class Person:
    person_id: str
    identifiers: list[IdKey]
    merged_person_ids: list[str]
    redirected_from: str
    create_time: datetime | None
    update_time: datetime | None
    # When the reads this answer comes from began: it holds every change committed before then.
    read_time: datetime | None = None
