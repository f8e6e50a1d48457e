"""Prediction service figures, each next to a baseline measured in the same run.

    .venv/bin/python -m bench.prediction [--persons 400] [--rounds 5] [--singles 300]

(a) batch scoring throughput: BatchScorePersons over gRPC (histories fetched from profile, scored,
    0 top features) in persons/s, vs raw `Booster.predict` (one thread) on the same persons' feature
    matrix computed locally, in rows/s. To show where the time goes, in the same run: profile's
    BatchGetProfiles alone (the fetch the service makes, called from here), the service's scoring of
    fetched histories (`score_histories`: features, one predict, results) and its booster step alone
    (`Scorer.score_matrix` on the matrix);
(b) single-person ScorePerson latency p50/p99 including the feature fetch (5 top features), by person
    id and by identifier: first the maximum rate with 4 callers back to back (closed loop), then
    p50/p99 in an open loop at half that rate (latency counted from when each call was due).

Identity, profile and prediction run as separate processes (as deployed: no shared GIL with this
client) on free ports, against keyspaces of the benchmark's own that are dropped at the end. The
data are synthetic shoppers ingested through profile's IngestEvents; the model is trained through
TrainModel.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

import grpc
import lightgbm as lgb
from google.longrunning import operations_pb2
from google.protobuf import timestamp_pb2
from onecdp.common.v1 import common_pb2
from onecdp.prediction.v1 import prediction_service_pb2 as pb
from onecdp.prediction.v1 import prediction_service_pb2_grpc as pb_grpc
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc

from bench.common import (
    LoadResult,
    bench_cassandra,
    closed_loop,
    console,
    figures_table,
    open_loop,
    service_processes,
)
from services.prediction.features import feature_matrix, feature_row
from services.prediction.history import PersonRef
from services.prediction.profile_source import GrpcProfileSource
from services.prediction.registry import ModelRegistry
from services.prediction.scoring import Scorer
from services.prediction.serving import ScoringVersion, score_histories
from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.config import SERVICE_NAMES, CassandraSettings
from tests.services.prediction.stack import identifier_of, ingest
from tests.services.prediction.synthetic import day, synthetic_events

MODEL = "bench-buyers"
TRAINING_CUTOFFS = [day(d) for d in ("2023-10-01", "2023-12-01", "2024-02-01", "2024-04-01")]
VALIDATION_CUTOFF = day("2024-06-01")
SERVICES = ("identity", "profile", "prediction")


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(value)
    return message


def train(stub: pb_grpc.PredictionServiceStub, model_id: str, spec: pb.ModelSpec, training_cutoffs: Sequence[datetime],
          validation_cutoff: datetime) -> pb.ModelVersion:
    """CreateModel, then TrainModel (activating the version), polled until done; the trained version."""
    stub.CreateModel(pb.CreateModelRequest(model_id=model_id, model=pb.Model(spec=spec)), timeout=10)
    operation = stub.TrainModel(pb.TrainModelRequest(
        name=f"models/{model_id}", training_cutoffs=[timestamp(t) for t in training_cutoffs],
        validation_cutoff=timestamp(validation_cutoff), activate=True), timeout=10)
    while not operation.done:
        time.sleep(0.2)
        operation = stub.GetOperation(operations_pb2.GetOperationRequest(name=operation.name), timeout=10)
    version = pb.ModelVersion()
    if not operation.response.Unpack(version):
        raise RuntimeError(f"training failed: {operation.error.message}")
    return version


def best_rate(rounds: int, work: int, action: Callable[[], object]) -> float:
    """The best of `rounds` timings of `action()` as work items per second (the least disturbed run)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return work / best


@dataclass(frozen=True)
class Latency:
    max_rate: float  # calls/s with 4 callers back to back
    offered: LoadResult  # the open loop at half of max_rate


def single_latency(stub: pb_grpc.PredictionServiceStub, selectors: Sequence[common_pb2.PersonSelector],
                   seconds: float) -> Latency:
    def request(index: int) -> pb.ScorePersonRequest:
        return pb.ScorePersonRequest(model=f"models/{MODEL}", person=selectors[index % len(selectors)])

    def score_one(index: int) -> int:
        stub.ScorePerson(request(index), timeout=10)
        return 1

    def start_one(index: int) -> Future[object]:
        # A grpc future has the add_done_callback/exception that open_loop uses.
        return cast(Future[object], stub.ScorePerson.future(request(index), timeout=10))

    for index in range(20):  # warm the channel and the scorer cache
        score_one(index)
    maximum = closed_loop(score_one, threads=4, seconds=seconds / 2)
    return Latency(maximum.rate, open_loop(start_one, rate=max(maximum.rate / 2, 1.0), seconds=seconds))


def drop_keyspaces(admin: CassandraSession, settings: CassandraSettings) -> None:
    for name in SERVICE_NAMES:
        admin.execute(f"DROP KEYSPACE IF EXISTS {settings.keyspace(name)}", timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--persons", type=int, default=400, help="synthetic shoppers to ingest (~12 events each)")
    parser.add_argument("--rounds", type=int, default=5, help="timed repetitions of each batch figure")
    parser.add_argument("--seconds", type=float, default=8.0, help="open-loop ScorePerson run per selector kind")
    args = parser.parse_args(argv)

    with bench_cassandra("prediction") as (settings, admin), service_processes(settings, SERVICES) as ports:
        try:
            events = synthetic_events(args.persons, seed=11)
            with grpc.insecure_channel(f"127.0.0.1:{ports['profile']}") as profile_channel, \
                    grpc.insecure_channel(f"127.0.0.1:{ports['prediction']}") as channel:
                started = time.perf_counter()
                person_ids = ingest(profile_grpc.ProfileServiceStub(profile_channel), events)
                console.print(f"ingested {sum(map(len, events.values())):,} events of {len(events):,} persons "
                              f"through profile in {time.perf_counter() - started:.1f} s")
                stub = pb_grpc.PredictionServiceStub(channel)
                started = time.perf_counter()
                version = train(stub, MODEL, pb.ModelSpec(kind=pb.PREDICTION_KIND_CONVERSION, horizon_days=60),
                                TRAINING_CUTOFFS, VALIDATION_CUTOFF)
                console.print(f"trained {version.name} through TrainModel in {time.perf_counter() - started:.1f} s "
                              f"(validation ROC AUC {version.metrics.roc_auc:.3f})")
                names = sorted(person_ids)
                selectors = [common_pb2.PersonSelector(person_id=person_ids[n]) for n in names]

                def batch_call() -> None:
                    response = stub.BatchScorePersons(pb.BatchScorePersonsRequest(
                        model=f"models/{MODEL}", persons=selectors), timeout=120)
                    assert all(r.WhichOneof("outcome") == "score" for r in response.results)

                batch_call()  # warm up
                service_rate = best_rate(args.rounds, len(selectors), batch_call)

                # The fetch the service makes, from here: profile's BatchGetProfiles with events.
                now = datetime.now(UTC)
                source = GrpcProfileSource(profile_grpc.ProfileServiceStub(profile_channel))
                refs = [PersonRef(person_id=person_ids[n]) for n in names]
                fetch_rate = best_rate(args.rounds, len(refs), lambda: source.histories_of(refs, now))
                histories = source.histories_of(refs, now)

                # The same persons' feature matrix, computed here from the generated events as of now.
                rows = [feature_row(events[n], now) for n in names]
                matrix = feature_matrix(rows)
                cluster = connect_cluster(settings)
                try:
                    registry = ModelRegistry(open_session(cluster, settings.keyspace("prediction"), 30))
                    model_string = registry.load_booster(MODEL, 1)
                    stored = registry.get_version(MODEL, 1, with_quantiles=True)
                    model = registry.get_model(MODEL)
                finally:
                    cluster.shutdown()
                booster = lgb.Booster(model_str=model_string)
                raw_rate = best_rate(args.rounds * 4, len(rows), lambda: booster.predict(matrix, num_threads=1))
                scorer = Scorer(model_string, stored.feature_names, stored.score_quantiles)
                ids = [person_ids[n] for n in names]
                matrix_rate = best_rate(args.rounds * 4, len(rows), lambda: scorer.score_matrix(ids, matrix, now))
                scoring = ScoringVersion(model, stored, scorer)
                histories_rate = best_rate(args.rounds * 4, len(rows),
                                           lambda: score_histories(scoring, histories, now, top_features=0))

                by_id = single_latency(stub, selectors, args.seconds)
                by_identifier = single_latency(
                    stub, [common_pb2.PersonSelector(identifier=identifier_of(n)) for n in names], args.seconds)
        finally:
            drop_keyspaces(admin, settings)

    def latency_row(what: str, latency: Latency) -> tuple[str, str, str]:
        offered = latency.offered
        return (f"ScorePerson {what}, p50 / p99",
                f"{offered.percentile_ms(50):.1f} / {offered.percentile_ms(99):.1f} ms",
                f"open loop at {offered.operations / offered.seconds:,.0f}/s = half of the {latency.max_rate:,.0f}/s "
                f"4 callers reach; {offered.operations} calls, {offered.errors} errors; aim p99 <= 15 ms")

    load = os.getloadavg()
    console.print(figures_table(f"prediction service ({len(selectors)} persons per batch, 1 predict thread; "
                                f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f})", [
        ("BatchScorePersons (fetch from profile + score)", f"{service_rate:,.0f} persons/s",
         f"raw Booster.predict {raw_rate:,.0f} rows/s: ratio {service_rate / raw_rate:.4f} (aim >= 0.7)"),
        ("  profile BatchGetProfiles alone (the fetch)", f"{fetch_rate:,.0f} persons/s",
         f"BatchScorePersons / fetch: ratio {service_rate / fetch_rate:.2f}"),
        ("  scoring fetched histories (features + predict + results)", f"{histories_rate:,.0f} persons/s",
         f"raw Booster.predict: ratio {histories_rate / raw_rate:.2f}"),
        ("  booster step alone (Scorer.score_matrix)", f"{matrix_rate:,.0f} rows/s",
         f"raw Booster.predict: ratio {matrix_rate / raw_rate:.2f}"),
        latency_row("by person id", by_id),
        latency_row("by identifier", by_identifier),
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
