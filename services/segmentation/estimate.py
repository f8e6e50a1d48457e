"""Estimating how many persons a rule selects, from a uniform sample of profiles.

Profiles are spread over the token ring by the hash of their person id, so a token-range shard holds
a uniform random subset of them. The estimate scans whole shards, picked at random, until it has
seen at least the asked sample size, and scales by the share of the ring scanned. Whole shards keep
that share known, so the sample overshoots the asked size by part of a shard: the ring is cut into
small shards (1/256), and shards are scanned in parallel only as far as the profiles per shard seen
so far say the asked size is still out of reach.

    estimated total   = profiles scanned / share
    estimated members = matches scanned / share
    margin (95 %)     = z * sqrt((1 - share) * (matches + z² (1 - share) / 4)) / share

The interval is for the member count, and the sample's own size is random: a person's token is the Murmur3
hash of their id, so whether they fall in the scanned shards is a coin flip of probability `share`,
independent of everything a rule reads and of every other person (within a shard persons are not sampled
one by one, but the hash has already scattered them: a shard is itself a Bernoulli sample of the ring).
That is Bernoulli sampling (Särndal, Swensson & Wretman, Model Assisted Survey Sampling, 1992, ch. 3):
the matches are Binomial(members, share), the count matches / share is its Horvitz-Thompson estimator,
of variance members (1 - share) / share. The margin is the half-length of the score (Wilson, 1927)
interval for `members` that inverts |matches - share·members| <= z sqrt(share (1 - share) members): it is
the normal one, z sqrt(matches (1 - share)) / share, plus z² (1 - share) / 4 under the root, so that a
sample with no or few matches still has a margin (the interval itself is centred a little above
matches / share; its half-length around matches / share still covers ~95%, more when matches are few).

Before, the margin was total * Wilson half-width of the proportion * sqrt(1 - share): the simple random
sample's, as if the total were known and only the share of members among it estimated. The total is
estimated from the same shards, and the count's variance is the proportion's over (1 - proportion): that
margin covered the count 75% of the time at a proportion of 0.66 (tests/.../test_estimate_coverage.py
simulates the sampling; ~95% now). Where the shards are a random set of a population whose hash did not
scatter the members (not the case here), the shard-to-shard variance (cluster sampling, Cochran 1977
ch. 9A) would be the one to use; it needs several shards, and a sample of a large population is one shard.
When every shard was scanned the count is exact and the margin 0.
"""

from __future__ import annotations

import math
import random
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime

from services.segmentation.evaluation import compile_rule, evaluation_failed
from services.segmentation.realtime import events_read, profile_reads
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
    # Only what the rule reads, as a recompute reads it: every trait and the computed traits (derived by profile
    # from every event of a person) cost reads no evaluation of this rule needs.
    fields = profile_reads([rule], rules, as_of)
    shards = source.shards(SHARDS)
    (chooser or random.Random()).shuffle(shards)
    member = compile_rule(rule, as_of, rules.get)

    def scan(shard: str) -> tuple[int, int]:
        scanned = matched = 0
        for batch in source.scan(shard, as_of, events, fields):
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
    return SizeEstimate(round(matched / share), scanned, matched, round(scanned / share),
                        margin_of_error(matched, share))


def margin_of_error(matched: int, share: float) -> int:
    """Half-length of the 95% score interval for the member count, from `matched` members found in a
    Bernoulli sample of inclusion probability `share` (< 1): see the module's docstring."""
    spread = Z_95 * Z_95 * (1 - share)
    return math.ceil(math.sqrt(spread * (matched + spread / 4)) / share)
