"""Prediction service figures, each next to a baseline measured in the same run.

    .venv/bin/python -m bench.prediction [--persons 400] [--rounds 5] [--singles 300]

(a) batch scoring throughput: BatchScorePersons over gRPC (features fetched from profile, scored,
    explained with 0 top features) in persons/s, vs raw `Booster.predict` (one thread) on the same
    persons' feature matrix computed locally, in rows/s; and the service's own scoring step
    (`Scorer.score_rows` on that matrix, no fetch) vs the same baseline, to show where time goes;
(b) single-person ScorePerson latency p50/p99 including the feature fetch (one caller, back to back,
    5 top features), by person id and by identifier.

Identity, profile and prediction run as separate processes (as deployed: no shared GIL with this
client) on free ports, against keyspaces of the benchmark's own that are dropped at the end. The
data are synthetic shoppers ingested through profile's IngestEvents; the model is trained through
TrainModel.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime

import grpc
import lightgbm as lgb
from google.longrunning import operations_pb2
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onecdp.common.v1 import common_pb2
from onecdp.prediction.v1 import prediction_service_pb2 as pb
from onecdp.prediction.v1 import prediction_service_pb2_grpc as pb_grpc
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc

from bench.common import LoadResult, bench_cassandra, closed_loop, console, figures_table
from services.prediction.features import feature_matrix, feature_row
from services.prediction.registry import ModelRegistry
from services.prediction.scoring import Scorer
from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.config import SERVICE_NAMES, CassandraSettings
from tests.services.prediction.stack import identifier_of, ingest
from tests.services.prediction.synthetic import day, synthetic_events

MODEL = "bench-buyers"
TRAINING_CUTOFFS = [day(d) for d in ("2023-10-01", "2023-12-01", "2024-02-01", "2024-04-01")]
VALIDATION_CUTOFF = day("2024-06-01")
SERVICES = ("identity", "profile", "prediction")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(value)
    return message


@contextmanager
def service_processes(settings: CassandraSettings) -> Iterator[dict[str, int]]:
    """Identity, profile and prediction as `python -m services.<name>` processes; their ports."""
    ports = {name: _free_port() for name in SERVICES}
    env = {**os.environ, "CASSANDRA_KEYSPACE_PREFIX": settings.keyspace_prefix, "ONECDP_BIND_HOST": "127.0.0.1",
           "ONECDP_LOG_LEVEL": "WARNING", "ONECDP_GRACE_PERIOD_SECONDS": "1"}
    for name, port in ports.items():
        env[f"ONECDP_{name.upper()}_PORT"] = str(port)
        env[f"ONECDP_{name.upper()}_TARGET"] = f"127.0.0.1:{port}"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for name in SERVICES:
            processes.append(subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=env,
                                              stdout=subprocess.DEVNULL))
            _wait_serving(ports[name], processes[-1])
        yield ports
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def _wait_serving(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"a service exited with status {process.returncode} before serving")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no service answered on port {port} within 120 s")
            time.sleep(0.2)


def train(stub: pb_grpc.PredictionServiceStub) -> pb.ModelVersion:
    stub.CreateModel(pb.CreateModelRequest(model_id=MODEL, model=pb.Model(spec=pb.ModelSpec(
        kind=pb.PREDICTION_KIND_CONVERSION, horizon_days=60))), timeout=10)
    operation = stub.TrainModel(pb.TrainModelRequest(
        name=f"models/{MODEL}", training_cutoffs=[_timestamp(t) for t in TRAINING_CUTOFFS],
        validation_cutoff=_timestamp(VALIDATION_CUTOFF), activate=True), timeout=10)
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


def single_latency(stub: pb_grpc.PredictionServiceStub, selectors: Sequence[common_pb2.PersonSelector],
                   calls: int) -> LoadResult:
    def score_one(index: int) -> int:
        stub.ScorePerson(pb.ScorePersonRequest(model=f"models/{MODEL}", person=selectors[index % len(selectors)]),
                         timeout=10)
        return 1

    for index in range(20):  # warm the channel and the scorer cache
        score_one(index)
    # One caller, back to back: latency without queueing behind our own calls. Bounded by `calls`.
    seconds = max(1.0, calls / 100)
    return closed_loop(score_one, threads=1, seconds=seconds)


def drop_keyspaces(admin: CassandraSession, settings: CassandraSettings) -> None:
    for name in SERVICE_NAMES:
        admin.execute(f"DROP KEYSPACE IF EXISTS {settings.keyspace(name)}", timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--persons", type=int, default=400, help="synthetic shoppers to ingest (~12 events each)")
    parser.add_argument("--rounds", type=int, default=5, help="timed repetitions of each batch figure")
    parser.add_argument("--singles", type=int, default=300, help="about how many single ScorePerson calls")
    args = parser.parse_args(argv)

    with bench_cassandra("prediction") as (settings, admin), service_processes(settings) as ports:
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
                version = train(stub)
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

                # The same persons' feature matrix, computed here from the generated events as of now.
                now = datetime.now(UTC)
                rows = [feature_row(events[n], now) for n in names]
                matrix = feature_matrix(rows)
                cluster = connect_cluster(settings)
                try:
                    registry = ModelRegistry(open_session(cluster, settings.keyspace("prediction"), 30))
                    model_string = registry.load_booster(MODEL, 1)
                    stored = registry.get_version(MODEL, 1, with_quantiles=True)
                finally:
                    cluster.shutdown()
                booster = lgb.Booster(model_str=model_string)
                raw_rate = best_rate(args.rounds * 4, len(rows), lambda: booster.predict(matrix, num_threads=1))
                scorer = Scorer(model_string, stored.feature_names, stored.score_quantiles)
                scorer_rate = best_rate(args.rounds * 4, len(rows),
                                        lambda: scorer.score_rows([person_ids[n] for n in names], rows, now))

                by_id = single_latency(stub, selectors, args.singles)
                by_identifier = single_latency(
                    stub, [common_pb2.PersonSelector(identifier=identifier_of(n)) for n in names], args.singles)
        finally:
            drop_keyspaces(admin, settings)

    console.print(figures_table(f"prediction service ({len(selectors)} persons per batch, 1 predict thread)", [
        ("BatchScorePersons (fetch from profile + score)", f"{service_rate:,.0f} persons/s",
         f"raw Booster.predict {raw_rate:,.0f} rows/s: ratio {service_rate / raw_rate:.4f} (aim >= 0.7)"),
        ("service scoring step alone (Scorer.score_rows)", f"{scorer_rate:,.0f} rows/s",
         f"raw Booster.predict: ratio {scorer_rate / raw_rate:.2f}"),
        ("ScorePerson by person id, p50 / p99", f"{by_id.percentile_ms(50):.1f} / {by_id.percentile_ms(99):.1f} ms",
         f"{by_id.operations} calls, 1 caller; aim p99 <= 15 ms"),
        ("ScorePerson by identifier, p50 / p99",
         f"{by_identifier.percentile_ms(50):.1f} / {by_identifier.percentile_ms(99):.1f} ms",
         f"{by_identifier.operations} calls, 1 caller; aim p99 <= 15 ms"),
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
