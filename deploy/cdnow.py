"""The CDNOW data set (Fader, Hardie & Lee): 69,659 CD purchases by 23,570 customers, 1997-01 to 1998-06.

It ships inside the `lifetimes` wheel. lifetimes' own loader needs pkg_resources, which modern
setuptools no longer installs, so the file is read here directly; the demo loader and the prediction
yardstick both use this reader.
"""

from __future__ import annotations

import importlib.metadata
from datetime import date
from pathlib import Path
from typing import NamedTuple

CDNOW_FILE = "lifetimes/datasets/CDNOW_master.txt"
HEADER = ("customer_id", "date", "number_of_cds", "dollar_value")


class CdnowPurchase(NamedTuple):
    customer_id: str  # zero-padded as in the file, e.g. "00001"
    date: date
    cds: int
    dollars: float


def cdnow_path() -> Path:
    return Path(str(importlib.metadata.distribution("lifetimes").locate_file(CDNOW_FILE)))


def read_cdnow(path: Path | None = None) -> list[CdnowPurchase]:
    """Every purchase in file order (grouped by customer, by date within a customer)."""
    purchases = []
    with (path or cdnow_path()).open(encoding="ascii") as lines:
        header = tuple(next(lines).split())
        if header != HEADER:
            raise ValueError(f"unexpected CDNOW header {header}; expected {HEADER}")
        for number, line in enumerate(lines, start=2):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != len(HEADER):
                raise ValueError(f"CDNOW line {number}: expected {len(HEADER)} fields, got {line!r}")
            customer_id, day, cds, dollars = fields
            purchases.append(CdnowPurchase(customer_id, date(int(day[:4]), int(day[4:6]), int(day[6:8])),
                                           int(cds), float(dollars)))
    return purchases
