"""Estimating how many persons a rule selects, from a uniform sample of profiles.

Profiles are spread over the token ring by the hash of their person id, so a token-range shard holds
a uniform random subset of them. The estimate scans whole shards, picked at random, until it has
seen at least the asked sample size, and scales by the share of the ring scanned. Whole shards keep
that share known, so the sample overshoots the asked size by part of a shard: the ring is cut into
small shards (1/256), and shards are scanned in parallel only as far as the profiles per shard seen
so far say the asked size is still out of reach.

    estimated total   = profiles scanned / share
    estimated members = matches scanned / share
    margin (95 %)     = total * (Wilson score half-width of p = matches / n) * sqrt(1 - share)

(Wilson rather than the normal approximation so that a sample with no or only matches still has a
margin; with the finite-population correction; it treats the sampled profiles as a simple random
sample, which the hash makes close to true). When every shard
was scanned the count is exact and the margin 0.
"""

from __future__ import annotations

import math
import random
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime

from services.segmentation.evaluation import compile_rule, evaluation_failed
from services.segmentation.realtime import events_read
from services.segmentation.recompute import ProfileSource
from services.segmentation.rules import Rule
from shared.errors import InvalidArgument

DEFAULT_SAMPLE = 1000
MAX_SAMPLE = 100_000
SHARDS = 256
PARALLEL_SCANS = 4
Z_95 = 1.959964


@dataclass(frozen=True)
class SizeEstimate:
    estimated_count: int
    sample_size: int
    sample_matches: int
    estimated_total_profiles: int
    margin_of_error: int


def sample_size_of(requested: int) -> int:
    if requested < 0 or requested > MAX_SAMPLE:
        raise InvalidArgument.for_field("sample_size", f"must be 0 (default {DEFAULT_SAMPLE}) to {MAX_SAMPLE}, "
                                                       f"got {requested}")
    return requested or DEFAULT_SAMPLE


def estimate_size(rule: Rule, rules: dict[str, Rule], source: ProfileSource, sample_size: int,
                  chooser: random.Random | None = None, *, segment_id: str = "") -> SizeEstimate:
    """Scan random shards until `sample_size` profiles were seen, evaluating `rule` (of the segment `segment_id`,
    or "" for a rule not saved) on each. A profile whose evaluation raises is logged and not sampled."""
    as_of = datetime.now(UTC)
    events = events_read([rule], rules, as_of)
    shards = source.shards(SHARDS)
    (chooser or random.Random()).shuffle(shards)
    member = compile_rule(rule, as_of, rules.get)

    def scan(shard: str) -> tuple[int, int]:
        scanned = matched = 0
        for batch in source.scan(shard, as_of, events):
            for facts in batch:
                try:
                    matches = member(facts)
                except Exception as error:  # contained (see `evaluation_failed`): left out of the sample
                    evaluation_failed(segment_id, facts.person_id, error)
                    continue
                scanned += 1
                matched += matches
        return scanned, matched

    scanned = matched = shards_done = 0
    remaining = iter(shards)
    with ThreadPoolExecutor(max_workers=PARALLEL_SCANS, thread_name_prefix="segment-estimate") as pool:
        running: set[Future[tuple[int, int]]] = set()
        while True:
            # Up to PARALLEL_SCANS shards in flight, but no more than the sample still needs: one shard
            # first, then as many as the profiles per shard so far say (none seen yet counts as 1).
            while len(running) < PARALLEL_SCANS and scanned < sample_size and (
                    not running or (shards_done > 0
                                    and scanned + len(running) * max(scanned, 1) / shards_done < sample_size)):
                shard = next(remaining, None)
                if shard is None:
                    break
                running.add(pool.submit(scan, shard))
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                shard_scanned, shard_matched = future.result()
                scanned += shard_scanned
                matched += shard_matched
                shards_done += 1
    share = shards_done / len(shards)
    if share >= 1.0 or scanned == 0:
        return SizeEstimate(matched, scanned, matched, scanned, 0)
    total = scanned / share
    proportion = matched / scanned
    z2 = Z_95 * Z_95
    wilson = Z_95 / (1 + z2 / scanned) * math.sqrt(proportion * (1 - proportion) / scanned
                                                   + z2 / (4 * scanned * scanned))
    margin = total * wilson * math.sqrt(1 - share)
    return SizeEstimate(round(matched / share), scanned, matched, round(total), math.ceil(margin))
