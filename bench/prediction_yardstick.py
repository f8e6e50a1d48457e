"""The CDNOW yardstick through the services: our conversion model, trained and scored over gRPC, vs BG/NBD.

    .venv/bin/python -m bench.prediction_yardstick [--customers 2000]

The first N CDNOW customers are loaded through profile (deploy.demo.load: identify events and
orders, as `make up` loads them); a conversion model is trained through TrainModel exactly as
tests/services/prediction/test_cdnow_yardstick.py trains it in domain code (60-day horizon, monthly
cutoffs 1997-04/05/06, validation 1997-08-01: nothing at or after T = 1997-09-30 reaches training);
every customer is scored with BatchScorePersons as of T (by crm id, so each read goes through identity).
BG/NBD is fitted on the same customers' purchases before T. Both are judged by ROC AUC on whether the
customer bought in the 39 weeks from T. A slice is smaller than the full data (23,570 customers), so
the AUCs move by about ±0.02 with the slice; the test on the full data is the one that asserts.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import timedelta

import grpc
import numpy as np
from onecdp.common.v1 import common_pb2
from onecdp.prediction.v1 import prediction_service_pb2 as pb
from onecdp.prediction.v1 import prediction_service_pb2_grpc as pb_grpc
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc

from bench.common import bench_cassandra, console, figures_table, service_processes
from bench.prediction import SERVICES, drop_keyspaces, timestamp, train
from deploy.cdnow import read_cdnow
from deploy.demo import crm_id, customers_of, load
from services.prediction.metrics import roc_auc
from tests.services.prediction.test_cdnow_yardstick import (
    CUTOFF,
    HORIZON_DAYS,
    TRAINING_CUTOFFS,
    TRAINING_HORIZON_DAYS,
    VALIDATION_CUTOFF,
    bg_nbd_expected_purchases,
)

MODEL = "cdnow-buyers"
# Persons per BatchScorePersons call.
SCORE_BATCH = 1000


def score_as_of_cutoff(stub: pb_grpc.PredictionServiceStub, customers: list[str]) -> list[float]:
    """Every customer's probability as of CUTOFF, by crm id (so each read goes through identity), in batches."""
    probabilities: list[float] = []
    for start in range(0, len(customers), SCORE_BATCH):
        response = stub.BatchScorePersons(pb.BatchScorePersonsRequest(
            model=f"models/{MODEL}", as_of_time=timestamp(CUTOFF),
            persons=[common_pb2.PersonSelector(identifier=common_pb2.Identifier(type="crm_id", value=crm_id(c)))
                     for c in customers[start:start + SCORE_BATCH]]), timeout=300)
        for customer, result in zip(customers[start:start + SCORE_BATCH], response.results, strict=True):
            if result.WhichOneof("outcome") != "score":
                raise RuntimeError(f"customer {customer} was not scored: {result.error.message}")
            probabilities.append(result.score.probability)
    return probabilities


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--customers", type=int, default=2000, help="the first N CDNOW customers (of 23,570)")
    args = parser.parse_args(argv)
    purchases = customers_of(read_cdnow(), args.customers)
    horizon_end = (CUTOFF + timedelta(days=HORIZON_DAYS)).date()
    # Held out: everyone who bought before T (every customer of a slice: CDNOW's cohort first bought in 1997-Q1).
    customers = sorted({p.customer_id for p in purchases if p.date < CUTOFF.date()})
    bought = {p.customer_id for p in purchases if CUTOFF.date() <= p.date < horizon_end}
    labels = np.array([c in bought for c in customers], dtype=np.int8)

    with bench_cassandra("prediction") as (settings, admin), service_processes(settings, SERVICES) as ports:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{ports['profile']}") as profile_channel, \
                    grpc.insecure_channel(f"127.0.0.1:{ports['prediction']}") as channel:
                summary = load(profile_grpc.ProfileServiceStub(profile_channel), purchases, streams=4)
                if summary.rejected:
                    raise RuntimeError(f"profile rejected {summary.rejected} demo events")
                console.print(f"loaded {summary.events:,} events of {len(customers):,} customers through profile "
                              f"in {summary.seconds:.1f} s")
                stub = pb_grpc.PredictionServiceStub(channel)
                started = time.perf_counter()
                version = train(stub, MODEL, pb.ModelSpec(kind=pb.PREDICTION_KIND_CONVERSION,
                                                          horizon_days=TRAINING_HORIZON_DAYS, min_class_count=20),
                                TRAINING_CUTOFFS, VALIDATION_CUTOFF)
                training_seconds = time.perf_counter() - started
                started = time.perf_counter()
                ours = score_as_of_cutoff(stub, customers)
                scoring_seconds = time.perf_counter() - started
        finally:
            drop_keyspaces(admin, settings)

    our_auc = roc_auc(labels, np.asarray(ours, dtype=np.float64))
    baseline_auc = roc_auc(labels, bg_nbd_expected_purchases(purchases, customers))
    console.print(figures_table(
        f"CDNOW through the services: first {len(customers):,} customers, cutoff {CUTOFF.date()}, "
        f"{HORIZON_DAYS}-day horizon, {int(labels.sum()):,} bought again", [
            ("ROC AUC, ours (TrainModel + BatchScorePersons as of T)", f"{our_auc:.4f}",
             f"{version.name}, {version.best_iteration} trees, trained in {training_seconds:.1f} s; "
             f"{len(customers):,} persons scored in {scoring_seconds:.1f} s"),
            ("ROC AUC, BG/NBD (lifetimes, expected purchases)", f"{baseline_auc:.4f}", "same customers and labels"),
            ("difference (ours - BG/NBD)", f"{our_auc - baseline_auc:+.4f}",
             "ours ranks these customers better" if our_auc > baseline_auc else "ours is not better here"),
        ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
