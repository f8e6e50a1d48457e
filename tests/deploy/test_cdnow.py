"""The CDNOW reader: the whole file, as the literature describes it."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from deploy.cdnow import CdnowPurchase, read_cdnow

pytestmark = pytest.mark.unit


def test_reads_every_purchase() -> None:
    purchases = read_cdnow()
    assert len(purchases) == 69_659
    assert len({p.customer_id for p in purchases}) == 23_570
    assert min(p.date for p in purchases) == date(1997, 1, 1)
    assert max(p.date for p in purchases) == date(1998, 6, 30)
    # The first lines of the file: customer 00001 bought once; 00002 twice on one day.
    assert purchases[:3] == [CdnowPurchase("00001", date(1997, 1, 1), 1, 11.77),
                             CdnowPurchase("00002", date(1997, 1, 12), 1, 12.00),
                             CdnowPurchase("00002", date(1997, 1, 12), 5, 77.00)]
    assert all(p.cds >= 0 and p.dollars >= 0 for p in purchases)


def test_a_malformed_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cdnow.txt"
    path.write_text(" customer_id  date number_of_cds  dollar_value\n 00001 19970101  1\n")
    with pytest.raises(ValueError, match="line 2"):
        read_cdnow(path)
    path.write_text("id date cds dollars\n")
    with pytest.raises(ValueError, match="header"):
        read_cdnow(path)
