"""The Kubernetes overlays, rendered with the pinned kustomize, agree with the code that runs in them.

Each overlay must pass deploy.manifests' checks (strict schemas, settings, wiring); the facts the issue
names are also asserted here directly; and every check is shown to fire on a broken copy of the
rendered manifests, so a check that silently passes everything would fail this file.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deploy import manifests
from deploy.manifests import OneCdpContainer, Resource
from shared.config import SERVICE_NAMES, CassandraSettings, GrpcSettings, env_var_names

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Resource]]:
    return {directory.name: manifests.render(directory) for directory in manifests.overlay_dirs()}


def _containers(resources: list[Resource]) -> list[OneCdpContainer]:
    containers, problems = manifests.onecdp_containers(resources)
    assert problems == []
    return containers


def _settings(container: OneCdpContainer, resources: list[Resource]) -> tuple[CassandraSettings, GrpcSettings]:
    env, problems = manifests.container_env(container.container, resources, container.where)
    assert problems == []
    return manifests.settings_from_env(env)


def _one(resources: list[Resource], kind: str, name: str) -> Resource:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"].startswith(name)]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} matches"
    return matches[0]


def test_there_is_a_dev_and_a_prod_overlay() -> None:
    assert {directory.name for directory in manifests.overlay_dirs()} >= {"dev", "prod"}


def test_kustomize_is_the_version_bootstrap_pins() -> None:
    pinned = re.search(r"^KUSTOMIZE_VERSION=(\S+)$", (REPO / "deploy/bootstrap.sh").read_text(), re.MULTILINE)
    assert pinned is not None
    installed = subprocess.run([str(manifests.kustomize_binary()), "version"], capture_output=True, text=True,
                               check=True, timeout=30).stdout.strip()
    assert installed == pinned.group(1)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_the_overlay_passes_every_check(rendered: dict[str, list[Resource]], overlay: str) -> None:
    checked = manifests.check_resources(overlay, rendered[overlay])
    assert [str(problem) for problem in checked.problems] == []
    assert len(checked.resources) > 15
    # The CRD is the only object without a Kubernetes schema, and it is skipped by name, not silently.
    assert checked.skipped_custom_resources == (["CassandraDatacenter/dc1"] if overlay == "prod" else [])


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_env_var_the_manifests_set_is_one_the_settings_read(rendered: dict[str, list[Resource]],
                                                                  overlay: str) -> None:
    resources = rendered[overlay]
    containers = _containers(resources)
    assert {c.runs for c in containers} == {*SERVICE_NAMES, "migrations"}
    set_anywhere: set[str] = set()
    for container in containers:
        env, problems = manifests.container_env(container.container, resources, container.where)
        assert problems == []
        assert set(env) <= env_var_names(), f"{container.where}: {sorted(set(env) - env_var_names())}"
        set_anywhere |= set(env)
    # Not vacuous: the variables that matter in a cluster are among them.
    assert {"CASSANDRA_CONTACT_POINTS", "CASSANDRA_REPLICATION_FACTOR", "ONECDP_MIGRATE_ON_START",
            "ONECDP_IDENTITY_TARGET", "ONECDP_HEALTH_PORT"} <= set_anywhere


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_ports_probes_services_and_targets_match_the_settings(rendered: dict[str, list[Resource]],
                                                              overlay: str) -> None:
    resources = rendered[overlay]
    for container in _containers(resources):
        if container.runs not in SERVICE_NAMES:
            continue
        _, grpc_settings = _settings(container, resources)
        port = grpc_settings.port_of(container.runs)
        assert port == GrpcSettings.model_fields[f"{container.runs}_port"].default
        assert port in [p["containerPort"] for p in container.container["ports"]]
        assert grpc_settings.health_port is not None
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container.container[probe]["grpc"]["port"] == grpc_settings.health_port
        service = _one(resources, "Service", container.runs)
        assert service["spec"]["clusterIP"] == "None"
        assert [p["port"] for p in service["spec"]["ports"]] == [port]
        assert grpc_settings.target_of(container.runs) == f"dns:///{container.runs}.onecdp.svc.cluster.local:{port}"
        assert grpc_settings.migrate_on_start is False


def test_prod_runs_three_cassandra_nodes_with_three_replicas_and_mtls(rendered: dict[str, list[Resource]]) -> None:
    resources = rendered["prod"]
    datacenter = _one(resources, "CassandraDatacenter", "dc1")
    assert datacenter["apiVersion"] == "cassandra.datastax.com/v1beta1" and datacenter["spec"]["size"] == 3
    for container in _containers(resources):
        cassandra, grpc_settings = _settings(container, resources)
        assert cassandra.replication_factor == 3 and cassandra.local_dc == "dc1"
        if container.runs in SERVICE_NAMES:
            tls = grpc_settings.tls_files()
            assert tls is not None
            mounts = {m["mountPath"]: m["name"] for m in container.container["volumeMounts"]}
            volumes = {v["name"]: v for v in container.pod_spec["volumes"]}
            for path in tls:
                assert volumes[mounts[str(path.parent)]]["secret"]["secretName"] == "onecdp-tls"


def test_prod_adds_the_cassandra_login_without_dropping_what_the_base_sets(tmp_path: Path) -> None:
    # A variable the base sets on a container directly must survive the prod overlay's credentials patch.
    k8s = tmp_path / "k8s"
    shutil.copytree(REPO / "k8s", k8s)
    settings_ref = "                name: onecdp-settings\n"
    direct_env = settings_ref + "          env:\n            - name: ONECDP_LOG_LEVEL\n              value: WARNING\n"
    for name in ("profile.yaml", "migrations.yaml"):
        path = k8s / "base" / name
        assert path.read_text().count(settings_ref) == 1
        path.write_text(path.read_text().replace(settings_ref, direct_env))
    resources = manifests.render(k8s / "overlays" / "prod")
    for container in _containers(resources):
        env = {variable["name"]: variable for variable in container.container.get("env", [])}
        assert env["CASSANDRA_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "onecdp-cassandra", "key": "password"}
        assert "CASSANDRA_USERNAME" in env
        assert ("ONECDP_LOG_LEVEL" in env) == (container.runs in {"profile", "migrations"}), container.where


def test_dev_runs_one_cassandra_node_in_plaintext(rendered: dict[str, list[Resource]]) -> None:
    resources = rendered["dev"]
    assert _one(resources, "StatefulSet", "cassandra")["spec"]["replicas"] == 1
    assert _one(resources, "Service", "cassandra")["spec"]["clusterIP"] == "None"
    for container in _containers(resources):
        cassandra, grpc_settings = _settings(container, resources)
        assert cassandra.replication_factor == 1 and grpc_settings.tls_files() is None


# --- the checks fire on broken manifests ------------------------------------------------------------------


def _deployment_container(resources: list[Resource], service: str) -> dict[str, Any]:
    container: dict[str, Any] = _one(resources, "Deployment", service)["spec"]["template"]["spec"]["containers"][0]
    return container


def _settings_map(resources: list[Resource]) -> dict[str, str]:
    data: dict[str, str] = _one(resources, "ConfigMap", "onecdp-settings")["data"]
    return data


def _typo_in_a_variable_name(resources: list[Resource]) -> None:
    _deployment_container(resources, "identity")["env"].append({"name": "ONECDP_IDENTTY_PORT", "value": "50051"})


def _typo_in_a_value(resources: list[Resource]) -> None:
    _settings_map(resources)["CASSANDRA_CONSISTENCY"] = "LOCAL_QUROUM"


def _wrong_container_port(resources: list[Resource]) -> None:
    _deployment_container(resources, "identity")["ports"][0]["containerPort"] = 50061


def _wrong_service_port(resources: list[Resource]) -> None:
    _one(resources, "Service", "profile")["spec"]["ports"][0]["port"] = 50062


def _service_with_a_cluster_ip(resources: list[Resource]) -> None:
    del _one(resources, "Service", "segmentation")["spec"]["clusterIP"]


def _target_in_another_namespace(resources: list[Resource]) -> None:
    _settings_map(resources)["ONECDP_PREDICTION_TARGET"] = "dns:///prediction.default.svc.cluster.local:50054"


def _probe_on_the_mtls_port(resources: list[Resource]) -> None:
    _deployment_container(resources, "identity")["readinessProbe"]["grpc"]["port"] = 50051


def _grace_longer_than_the_pod_allows(resources: list[Resource]) -> None:
    _settings_map(resources)["ONECDP_GRACE_PERIOD_SECONDS"] = "60"


def _prediction_with_the_default_termination_grace(resources: list[Resource]) -> None:
    # 5 s preStop + 15 s grace fit 30 s, but not with the 30 s prediction's worker may take to stop.
    _one(resources, "Deployment", "prediction")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30


def _writable_root_filesystem(resources: list[Resource]) -> None:
    _deployment_container(resources, "profile")["securityContext"]["readOnlyRootFilesystem"] = False


def _unknown_field(resources: list[Resource]) -> None:
    _deployment_container(resources, "identity")["livenessProbe"]["grpc"]["prot"] = 8081


def _unknown_custom_resource(resources: list[Resource]) -> None:
    resources.append({"apiVersion": "example.com/v1", "kind": "Widget",
                      "metadata": {"name": "w", "namespace": "onecdp"}})


def _server_version_the_operator_rejects(resources: list[Resource]) -> None:
    _one(resources, "CassandraDatacenter", "dc1")["spec"]["serverVersion"] = "5.0"


def _misspelt_datacenter_field(resources: list[Resource]) -> None:
    # The CRD preserves unknown spec fields: the cluster would accept this and run without the zones.
    rack = _one(resources, "CassandraDatacenter", "dc1")["spec"]["racks"][0]
    rack["nodeAffinityLabel"] = rack.pop("nodeAffinityLabels")


def _more_replicas_than_nodes(resources: list[Resource]) -> None:
    _settings_map(resources)["CASSANDRA_REPLICATION_FACTOR"] = "5"


def _wrong_datacenter(resources: list[Resource]) -> None:
    _settings_map(resources)["CASSANDRA_LOCAL_DC"] = "datacenter1"


def _migrating_on_start(resources: list[Resource]) -> None:
    _settings_map(resources)["ONECDP_MIGRATE_ON_START"] = "true"


def _fixed_replicas_under_an_autoscaler(resources: list[Resource]) -> None:
    _one(resources, "Deployment", "identity")["spec"]["replicas"] = 3


def _command_that_is_no_console_script(resources: list[Resource]) -> None:
    _deployment_container(resources, "prediction")["command"] = ["onecdp-predicton"]


def _settings_from_a_secret_not_in_the_overlay(resources: list[Resource]) -> None:
    _deployment_container(resources, "identity")["envFrom"].append({"secretRef": {"name": "somewhere-else"}})


def _loopback_cassandra(resources: list[Resource]) -> None:
    _settings_map(resources)["CASSANDRA_CONTACT_POINTS"] = "127.0.0.1"


BREAKAGES: list[tuple[Callable[[list[Resource]], None], str]] = [
    (_typo_in_a_variable_name, "sets ONECDP_IDENTTY_PORT, which no OneCDP setting reads"),
    (_typo_in_a_value, "invalid setting consistency"),
    (_wrong_container_port, "no containerPort 50051"),
    (_wrong_service_port, "Service profile has no port 50052"),
    (_service_with_a_cluster_ip, "Service segmentation is not headless"),
    (_target_in_another_namespace, "names Service 'prediction' in namespace 'default'"),
    (_probe_on_the_mtls_port, "readinessProbe checks port 50051, but health is served in plaintext on 8081"),
    (_grace_longer_than_the_pod_allows, "the pod would be killed mid-shutdown"),
    (_prediction_with_the_default_termination_grace,
     "terminationGracePeriodSeconds 30 < preStop 5 s + ONECDP_GRACE_PERIOD_SECONDS 15 s + 30 s for prediction's"),
    (_writable_root_filesystem, "the root filesystem is not read-only"),
    (_unknown_field, "Additional properties are not allowed ('prot' was unexpected)"),
    (_unknown_custom_resource, "Couldn't find schema for kind Widget"),
    (_server_version_the_operator_rejects, "CRD fields: spec.serverVersion: '5.0' does not match"),
    (_misspelt_datacenter_field, "('nodeAffinityLabel' was unexpected)"),
    (_more_replicas_than_nodes, "CASSANDRA_REPLICATION_FACTOR 5 > 3 Cassandra nodes"),
    (_wrong_datacenter, "CASSANDRA_LOCAL_DC is 'datacenter1' but the datacenter is 'dc1'"),
    (_migrating_on_start, "ONECDP_MIGRATE_ON_START is not false"),
    (_fixed_replicas_under_an_autoscaler, "sets replicas although an autoscaler owns the count"),
    (_command_that_is_no_console_script, "'onecdp-predicton' is not a console script"),
    (_settings_from_a_secret_not_in_the_overlay, "Secret 'somewhere-else', which the overlay does not contain"),
    (_loopback_cassandra, "CASSANDRA_CONTACT_POINTS is 127.0.0.1"),
]


@pytest.mark.parametrize(("break_it", "expected"), BREAKAGES, ids=[b.__name__.lstrip("_") for b, _ in BREAKAGES])
def test_the_check_finds_a_broken_manifest(rendered: dict[str, list[Resource]],
                                           break_it: Callable[[list[Resource]], None], expected: str) -> None:
    resources = copy.deepcopy(rendered["prod"])
    break_it(resources)
    problems = [str(problem) for problem in manifests.check_resources("prod", resources).problems]
    assert any(expected in problem for problem in problems), problems
