"""Render the Kubernetes overlays (`k8s/overlays/*`) and check them offline, the way CI does.

    python -m deploy.manifests check          # render every overlay and check it; exit 1 on any problem
    python -m deploy.manifests render prod    # print one rendered overlay (what `kubectl apply -k` sends)

Rendering uses the pinned kustomize that deploy/bootstrap.sh installs into `.venv/bin`. Each rendered
overlay is checked three ways:

1. **Schemas.** Every object against the Kubernetes API schemas shipped in kubernetes-validate, strict
   (unknown fields fail), for each version in KUBERNETES_VERSIONS. Custom resources have no schema
   there: the kinds in CUSTOM_RESOURCE_SCHEMAS are checked instead against the fields of their
   operator's CRD that we transcribed (noted with the operator version), and reported; any other kind
   without a schema is a problem, not a warning.
2. **Settings.** Every environment variable a OneCDP container gets (`env`, and the keys of the
   ConfigMaps/Secrets in `envFrom`) is one that shared.config reads, and the values parse with the
   same settings classes the services use.
3. **Wiring.** Ports, probes, headless Services and `dns:///` targets agree with the settings; the
   Cassandra the settings name is the one the overlay deploys; the shutdown budget fits; the pods run
   non-root on a read-only root filesystem without capabilities.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import jsonschema  # type: ignore[import-untyped]  # comes with kubernetes-validate, without type hints
import yaml  # type: ignore[import-untyped]  # types-PyYAML is not a dev dependency
from kubernetes_validate import utils as kubernetes_validate
from pydantic import ValidationError
from pydantic_settings import BaseSettings
from rich.console import Console
from rich.table import Table

from deploy import migration_job
from services.prediction import worker as prediction_worker
from shared.config import SERVICE_NAMES, CassandraSettings, GrpcSettings, env_var_names

REPO = Path(__file__).resolve().parent.parent
OVERLAYS_DIR = REPO / "k8s" / "overlays"
# The oldest Kubernetes we support (native gRPC probes are GA since 1.27, the preStop `sleep` action is
# on by default since 1.30) and the newest whose schemas the pinned kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.31", "1.37")
# Custom resources: their schemas come with their operators, not with Kubernetes, so the parts we use
# are transcribed here. CassandraDatacenter: cass-operator's v1beta1 CRD (apis/cassandra/v1beta1/
# cassandradatacenter_types.go, as of v1.23). Its spec preserves unknown fields, so the API server would
# accept a misspelt field and ignore it; here every spec, rack, user and storage field must be one the CRD
# declares, and serverVersion must match the CRD's pattern (5.x accepted since v1.16; Cassandra 5.0
# configuration generated properly since v1.21, the oldest operator the prod overlay supports).
_OBJECT = {"type": "object"}
# The rest of the CRD's spec fields: allowed, their values not checked here.
_OTHER_DATACENTER_FIELDS = (
    "serverImage", "dockerImageRunsAsCassandra", "configSecret", "managementApiAuth",
    "nodeAffinityLabels", "systemLoggerResources", "configBuilderResources", "replaceNodes", "stopped",
    "configBuilderImage", "canaryUpgrade", "canaryUpgradeCount", "allowMultipleNodesPerWorker",
    "superuserSecretName", "serviceAccount", "serviceAccountName", "rollingRestartRequested",
    "nodeSelector", "forceUpgradeRacks", "dseWorkloads", "podTemplateSpec", "networking",
    "additionalSeeds", "disableSystemLoggerSidecar", "systemLoggerImage", "additionalServiceConfig",
    "tolerations", "additionalLabels", "additionalAnnotations", "cdc", "datacenterName",
    "minReadySeconds", "readOnlyRootFilesystem",
)
CASSANDRA_DATACENTER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["spec"],
    "properties": {"spec": {
        "type": "object",
        "required": ["clusterName", "serverType", "serverVersion", "size", "storageConfig"],
        "additionalProperties": False,
        "properties": {
            "size": {"type": "integer", "minimum": 1},
            "serverVersion": {"type": "string",
                              "pattern": r"(6\.[89]\.\d+)|(3\.11\.\d+)|(4\.\d+\.\d+)|(5\.\d+\.\d+)|(1\.\d+\.\d+)"},
            "serverType": {"enum": ["cassandra", "dse", "hcd"]},
            "clusterName": {"type": "string", "minLength": 2},
            "racks": {"type": "array", "items": {
                "type": "object", "required": ["name"], "additionalProperties": False,
                "properties": {"name": {"type": "string", "minLength": 2}, "zone": {"type": "string"},
                               "nodeAffinityLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                               "affinity": _OBJECT}}},
            "storageConfig": {"type": "object", "additionalProperties": False,
                              "properties": {"cassandraDataVolumeClaimSpec": _OBJECT,
                                             "additionalVolumes": {"type": "array"}}},
            "users": {"type": "array", "items": {
                "type": "object", "required": ["secretName", "superuser"], "additionalProperties": False,
                "properties": {"secretName": {"type": "string"}, "superuser": {"type": "boolean"}}}},
            "config": _OBJECT,
            "resources": _OBJECT,
            **{field: {} for field in _OTHER_DATACENTER_FIELDS},
        },
    }},
}
CUSTOM_RESOURCE_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("cassandra.datastax.com/v1beta1", "CassandraDatacenter"): CASSANDRA_DATACENTER_SCHEMA,
}
# The migration Job's command: it waits for Cassandra, then runs shared.migrations.
MIGRATIONS_COMMAND = ("python", "-m", "deploy.migration_job")
# Time the migrations themselves take once Cassandra is there (schema changes wait for agreement).
MIGRATIONS_RUN_SECONDS = 120
# Time a service needs after its grace period and background stops: closing the Cassandra session and exiting.
SHUTDOWN_MARGIN_SECONDS = 5


class BackgroundStop(NamedTuple):
    """How long a service's stop callbacks may block: thread joins, plus Cassandra calls (each bounded by
    CASSANDRA_REQUEST_TIMEOUT_SECONDS)."""

    join_seconds: float
    cassandra_calls: int


# After the gRPC server has drained, shared.runner runs each service's stop callbacks before closing
# Cassandra. The longest each may block, from the services' code:
BACKGROUND_STOPS = {
    # IdentitySettings.stop: joins the settings reloader for up to 10 s (services/identity/settings.py)
    "identity": BackgroundStop(10.0, 0),
    # IdentityFollower.stop: joins for up to 10 s, then gives its lease back (services/profile/server.py)
    "profile": BackgroundStop(10.0, 1),
    # FeedFollower.stop: joins for up to 30 s, then releases its lease (services/segmentation/follower.py)
    "segmentation": BackgroundStop(30.0, 1),
    "prediction": BackgroundStop(prediction_worker.STOP_TIMEOUT_SECONDS, 0),  # BackgroundWorker.stop
}
# The kubelet's default when a pod does not say.
DEFAULT_TERMINATION_GRACE_SECONDS = 30
_CLUSTER_SERVICE = re.compile(r"^(?P<service>[a-z0-9-]+)\.(?P<namespace>[a-z0-9-]+)\.svc\.cluster\.local$")
_TARGET = re.compile(r"^dns:///(?P<host>[^:/]+):(?P<port>\d+)$")
_WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod")

Resource = dict[str, Any]
SettingsT = TypeVar("SettingsT", bound=BaseSettings)


@dataclass(frozen=True)
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class OneCdpContainer:
    """A container running the OneCDP image: a service (`identity`, ...) or the migrations."""

    workload: Resource
    pod_spec: dict[str, Any]
    container: dict[str, Any]
    runs: str

    @property
    def where(self) -> str:
        return f"{_name(self.workload)} container {self.container.get('name')}"

    @property
    def pod_labels(self) -> dict[str, str]:
        labels: dict[str, str] = _pod_template(self.workload).get("metadata", {}).get("labels", {})
        return labels


@dataclass(frozen=True)
class CheckedOverlay:
    name: str
    resources: list[Resource]
    skipped_custom_resources: list[str]
    problems: list[Problem]


# --- rendering --------------------------------------------------------------------------------------------


def kustomize_binary() -> Path:
    binary = Path(sys.prefix) / "bin" / "kustomize"
    if not binary.exists():
        raise FileNotFoundError(f"{binary} is missing: run deploy/bootstrap.sh (it installs the pinned kustomize)")
    return binary


def overlay_dirs() -> list[Path]:
    return sorted(path.parent for path in OVERLAYS_DIR.glob("*/kustomization.yaml"))


def render(kustomization_dir: Path) -> list[Resource]:
    """`kustomize build` of one directory, as a list of objects."""
    built = subprocess.run([str(kustomize_binary()), "build", str(kustomization_dir)],
                           check=False, capture_output=True, text=True, timeout=120)
    if built.returncode != 0:
        raise RuntimeError(f"kustomize build {kustomization_dir} failed:\n{built.stderr.strip()}")
    return [document for document in yaml.safe_load_all(built.stdout) if document]


# --- 1. schemas -------------------------------------------------------------------------------------------


def schema_problems(resources: list[Resource], versions: tuple[str, ...] = KUBERNETES_VERSIONS,
                    ) -> tuple[list[Problem], list[str]]:
    """Strict schema validation; returns the problems and the custom resources that kubernetes-validate
    has no schema for (checked against CUSTOM_RESOURCE_SCHEMAS instead)."""
    problems: list[Problem] = []
    skipped: list[str] = []
    for resource in resources:
        custom_schema = CUSTOM_RESOURCE_SCHEMAS.get((str(resource.get("apiVersion")), str(resource.get("kind"))))
        if custom_schema is not None:
            skipped.append(_name(resource))
            problems += [Problem(_name(resource), f"CRD fields: {'.'.join(map(str, error.path)) or '(top level)'}: "
                                                  f"{error.message}")
                         for error in jsonschema.Draft7Validator(custom_schema).iter_errors(resource)]
            continue
        serialized = json.dumps(resource, sort_keys=True)
        problems += [Problem(_name(resource), error) for version in versions
                     if (error := _schema_error(serialized, version)) is not None]
    return problems, skipped


@functools.lru_cache(maxsize=1024)
def _schema_error(serialized_resource: str, version: str) -> str | None:
    # Cached by content: kubernetes-validate reads its schema files on every call.
    resource = json.loads(serialized_resource)
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.path) or "(top level)"
        return f"Kubernetes {version} schema: {path}: {error.message}"
    except kubernetes_validate.SchemaNotFoundError as error:
        return (f"{error.message}; if it is a custom resource, add it to CUSTOM_RESOURCE_SCHEMAS in "
                "deploy/manifests.py")
    return None


# --- 2. settings ------------------------------------------------------------------------------------------


def onecdp_containers(resources: list[Resource]) -> tuple[list[OneCdpContainer], list[Problem]]:
    """Containers that run a OneCDP entrypoint, recognised by their command (pyproject's console scripts)."""
    commands = service_commands()
    found: list[OneCdpContainer] = []
    problems: list[Problem] = []
    for workload in resources:
        if workload.get("kind") not in _WORKLOAD_KINDS:
            continue
        pod_spec = _pod_template(workload).get("spec", {})
        for container in [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]:
            command = tuple(container.get("command") or ())
            if command in commands:
                found.append(OneCdpContainer(workload, pod_spec, container, commands[command]))
            elif command[:3] == MIGRATIONS_COMMAND:
                found.append(OneCdpContainer(workload, pod_spec, container, "migrations"))
            elif command and command[0].startswith("onecdp-"):
                problems.append(Problem(_name(workload), f"command {command[0]!r} is not a console script in "
                                                         "pyproject.toml [project.scripts]"))
    images = {c.container.get("image") for c in found}
    if len(images) > 1:
        problems.append(Problem("images", f"OneCDP containers run {len(images)} different images "
                                          f"({', '.join(sorted(map(str, images)))}); there is one image"))
    return found, problems


def service_commands() -> dict[tuple[str, ...], str]:
    """`("onecdp-identity",) -> "identity"`, from pyproject.toml's console scripts."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    commands: dict[tuple[str, ...], str] = {}
    for script in scripts:
        service = script.removeprefix("onecdp-")
        if service in SERVICE_NAMES:
            commands[(script,)] = service
    return commands


def container_env(container: dict[str, Any], resources: list[Resource],
                  where: str) -> tuple[dict[str, str | None], list[Problem]]:
    """The variables a container gets, as Kubernetes resolves them; None where the value is a Secret's."""
    problems: list[Problem] = []
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            reference, kind = source["configMapRef"], "ConfigMap"
        else:
            reference, kind = source["secretRef"], "Secret"
        found = _find(resources, kind, reference["name"])
        if found is None:
            if not reference.get("optional"):
                problems.append(Problem(where, f"envFrom names {kind} {reference['name']!r}, which the overlay does "
                                               "not contain, so its keys cannot be checked"))
            continue
        for key, value in _data_of(found).items():
            env[prefix + key] = value
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = str(variable["value"])
        elif "configMapKeyRef" in variable.get("valueFrom", {}):
            reference = variable["valueFrom"]["configMapKeyRef"]
            config_map = _find(resources, "ConfigMap", reference["name"])
            env[variable["name"]] = None if config_map is None else _data_of(config_map).get(reference["key"])
        else:
            env[variable["name"]] = None  # a Secret's value, or a field of the pod: known only in the cluster
    return env, problems


def settings_from_env(env: Mapping[str, str | None]) -> tuple[CassandraSettings, GrpcSettings]:
    """Both settings groups from the given variables only, never from this process's environment."""
    return _parse(CassandraSettings, env), _parse(GrpcSettings, env)


def _parse(settings_class: type[SettingsT], env: Mapping[str, str | None]) -> SettingsT:
    prefix = str(settings_class.model_config.get("env_prefix", ""))
    values = {name.removeprefix(prefix).lower(): value for name, value in env.items()
              if name.startswith(prefix) and value is not None and name in env_var_names()}
    # model_validate runs the same validators as the environment source, without reading os.environ.
    return settings_class.model_validate(values)


def settings_problems(containers: list[OneCdpContainer], resources: list[Resource]) -> list[Problem]:
    known = env_var_names()
    problems: list[Problem] = []
    for container in containers:
        env, missing = container_env(container.container, resources, container.where)
        problems += missing
        for name in sorted(set(env) - known):
            problems.append(Problem(container.where, f"sets {name}, which no OneCDP setting reads "
                                                     "(shared/config.py env_var_names())"))
        try:
            settings_from_env(env)
        except ValidationError as error:
            for failure in error.errors():
                field = ".".join(str(part) for part in failure["loc"]) or "settings"
                problems.append(Problem(container.where, f"invalid setting {field}: {failure['msg']}"))
    return problems


# --- 3. wiring --------------------------------------------------------------------------------------------


def wiring_problems(containers: list[OneCdpContainer], resources: list[Resource]) -> list[Problem]:
    problems = _namespace_problems(resources)
    services = {c.runs: c for c in containers if c.runs in SERVICE_NAMES}
    for service in SERVICE_NAMES:
        if service not in services:
            problems.append(Problem("overlay", f"no workload runs the {service} service"))
    if not any(c.runs == "migrations" for c in containers):
        problems.append(Problem("overlay", f"no Job runs the schema migrations ({' '.join(MIGRATIONS_COMMAND)})"))
    for container in containers:
        env, _ = container_env(container.container, resources, container.where)
        try:
            cassandra, grpc_settings = settings_from_env(env)
        except ValidationError:
            continue  # reported by settings_problems
        problems += _security_problems(container)
        problems += _cassandra_problems(container, cassandra, resources)
        if container.runs in SERVICE_NAMES:
            problems += _service_problems(container, grpc_settings, cassandra, resources)
            problems += _target_problems(container, grpc_settings, services, resources)
        else:
            problems += _migration_job_problems(container)
    return problems


def _namespace_problems(resources: list[Resource]) -> list[Problem]:
    namespaces = [r["metadata"]["name"] for r in resources if r.get("kind") == "Namespace"]
    if len(namespaces) != 1:
        return [Problem("overlay", f"expected one Namespace, found {len(namespaces)}")]
    return [Problem(_name(r), f"in namespace {r['metadata'].get('namespace')!r}, not {namespaces[0]!r}")
            for r in resources
            if r.get("kind") != "Namespace" and r["metadata"].get("namespace") != namespaces[0]]


def _security_problems(container: OneCdpContainer) -> list[Problem]:
    pod_security = container.pod_spec.get("securityContext", {})
    security = container.container.get("securityContext", {})
    problems = []
    if not security.get("runAsNonRoot", pod_security.get("runAsNonRoot")):
        problems.append("runAsNonRoot is not set")
    if not security.get("readOnlyRootFilesystem"):
        problems.append("the root filesystem is not read-only")
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if "ALL" not in security.get("capabilities", {}).get("drop", []):
        problems.append("capabilities are not all dropped")
    empty_dirs = {v["name"] for v in container.pod_spec.get("volumes", []) if "emptyDir" in v}
    if not any(m.get("mountPath") == "/tmp" and m.get("name") in empty_dirs
               for m in container.container.get("volumeMounts", [])):
        problems.append("no emptyDir at /tmp (the only writable place on a read-only root)")
    resources = container.container.get("resources", {})
    for bound in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in resources.get(bound, {}):
                problems.append(f"no {resource} {bound[:-1]}")
    return [Problem(container.where, message) for message in problems]


def _service_problems(container: OneCdpContainer, settings: GrpcSettings, cassandra: CassandraSettings,
                      resources: list[Resource]) -> list[Problem]:
    where, spec = container.where, container.container
    problems: list[Problem] = []
    port = settings.port_of(container.runs)
    container_ports = {p["containerPort"]: p.get("name") for p in spec.get("ports", [])}
    if port not in container_ports:
        problems.append(Problem(where, f"no containerPort {port}, the port ONECDP_{container.runs.upper()}_PORT "
                                       f"gives the {container.runs} service"))
    if settings.migrate_on_start:
        problems.append(Problem(where, "ONECDP_MIGRATE_ON_START is not false (the migration Job applies schemas)"))
    if settings.tls_files() is not None and settings.health_port is None:
        problems.append(Problem(where, "mutual TLS without ONECDP_HEALTH_PORT: the kubelet's gRPC probes "
                                       "cannot present a client certificate"))
    probe_port = port if settings.health_port is None else settings.health_port
    if settings.health_port is not None and settings.health_port not in container_ports:
        problems.append(Problem(where, f"no containerPort {settings.health_port} (ONECDP_HEALTH_PORT)"))
    for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = spec.get(probe_name)
        if probe is None:
            if probe_name != "startupProbe":
                problems.append(Problem(where, f"no {probe_name}"))
            continue
        if "grpc" not in probe:
            problems.append(Problem(where, f"{probe_name} is not a native gRPC probe"))
        elif _port_number(probe["grpc"]["port"], spec) != probe_port:
            problems.append(Problem(where, f"{probe_name} checks port {probe['grpc']['port']}, but health is "
                                           f"served in plaintext on {probe_port}"))
    problems += _shutdown_problems(container, settings, cassandra)
    deployment = container.workload
    if deployment.get("kind") == "Deployment":
        problems += _scaling_problems(deployment, container.pod_labels, resources)
    return problems


def _shutdown_problems(container: OneCdpContainer, settings: GrpcSettings,
                       cassandra: CassandraSettings) -> list[Problem]:
    pre_stop = container.container.get("lifecycle", {}).get("preStop", {})
    pause = pre_stop.get("sleep", {}).get("seconds")
    if pause is None:
        return [Problem(container.where, "no preStop sleep: SIGTERM would race the endpoint removal")]
    budget = container.pod_spec.get("terminationGracePeriodSeconds", DEFAULT_TERMINATION_GRACE_SECONDS)
    stop = BACKGROUND_STOPS[container.runs]
    background = stop.join_seconds + stop.cassandra_calls * cassandra.request_timeout_seconds
    needed = pause + settings.grace_period_seconds + background + SHUTDOWN_MARGIN_SECONDS
    if budget < needed:
        return [Problem(container.where, f"terminationGracePeriodSeconds {budget} < preStop {pause} s + "
                                         f"ONECDP_GRACE_PERIOD_SECONDS {settings.grace_period_seconds:g} s + "
                                         f"{background:g} s for {container.runs}'s background work to stop + "
                                         f"{SHUTDOWN_MARGIN_SECONDS} s to exit: the pod would be killed mid-shutdown")]
    return []


def _migration_job_problems(container: OneCdpContainer) -> list[Problem]:
    """A Job (not a long-running workload) whose deadline outlasts its wait for Cassandra."""
    job = container.workload
    if job.get("kind") != "Job":
        return [Problem(container.where, f"the migrations run in a {job.get('kind')}, not a Job")]
    arguments = [*container.container["command"][len(MIGRATIONS_COMMAND):], *container.container.get("args", [])]
    wait = migration_job.DEFAULT_WAIT_SECONDS
    for index, argument in enumerate(arguments):
        if argument == "--wait-seconds" and index + 1 < len(arguments):
            wait = float(arguments[index + 1])
        elif argument.startswith("--wait-seconds="):
            wait = float(argument.partition("=")[2])
    deadline = job["spec"].get("activeDeadlineSeconds")
    if deadline is not None and deadline < wait + MIGRATIONS_RUN_SECONDS:
        return [Problem(container.where, f"activeDeadlineSeconds {deadline} < --wait-seconds {wait:g} + "
                                         f"{MIGRATIONS_RUN_SECONDS} s to migrate: the Job would be killed while "
                                         "Cassandra may still be starting")]
    return []


def _scaling_problems(deployment: Resource, pod_labels: dict[str, str], resources: list[Resource]) -> list[Problem]:
    name = deployment["metadata"]["name"]
    problems = []
    autoscalers = [r for r in resources if r.get("kind") == "HorizontalPodAutoscaler"
                   and r["spec"]["scaleTargetRef"].get("kind") == "Deployment"
                   and r["spec"]["scaleTargetRef"].get("name") == name]
    if not autoscalers:
        problems.append("no HorizontalPodAutoscaler")
    elif not any(m.get("type") == "Resource" and m["resource"]["name"] == "cpu"
                 for m in autoscalers[0]["spec"].get("metrics", [])):
        problems.append("its HorizontalPodAutoscaler does not scale on CPU")
    if autoscalers and "replicas" in deployment["spec"]:
        problems.append("sets replicas although an autoscaler owns the count (every apply would reset it)")
    if not any(r.get("kind") == "PodDisruptionBudget" and _selects(r["spec"].get("selector", {}), pod_labels)
               for r in resources):
        problems.append("no PodDisruptionBudget selects its pods")
    return [Problem(_name(deployment), message) for message in problems]


def _target_problems(container: OneCdpContainer, settings: GrpcSettings, services: dict[str, OneCdpContainer],
                     resources: list[Resource]) -> list[Problem]:
    """Each ONECDP_<SERVICE>_TARGET reaches that service's pods through a headless Service, per call."""
    problems = []
    for callee, callee_container in services.items():
        target = settings.target_of(callee)
        match = _TARGET.match(target)
        host = _CLUSTER_SERVICE.match(match["host"]) if match else None
        if match is None or host is None:
            problems.append(f"ONECDP_{callee.upper()}_TARGET={target!r} is not dns:///<service>.<namespace>"
                            ".svc.cluster.local:<port> (a headless Service, balanced per call)")
            continue
        service = _find(resources, "Service", host["service"])
        if service is None or service["metadata"].get("namespace") != host["namespace"]:
            problems.append(f"ONECDP_{callee.upper()}_TARGET names Service {host['service']!r} in namespace "
                            f"{host['namespace']!r}, which the overlay does not contain")
            continue
        problems += [f"ONECDP_{callee.upper()}_TARGET: {message}"
                     for message in _headless_service_problems(service, int(match["port"]), callee_container)]
    return [Problem(container.where, message) for message in problems]


def _headless_service_problems(service: Resource, port: int, backend: OneCdpContainer) -> list[str]:
    name = f"Service {service['metadata']['name']}"
    spec = service["spec"]
    problems = []
    if spec.get("clusterIP") != "None":
        problems.append(f"{name} is not headless (clusterIP: None): gRPC would be balanced per connection")
    if not _selects({"matchLabels": spec.get("selector", {})}, backend.pod_labels):
        problems.append(f"{name} does not select the pods of {_name(backend.workload)}")
    service_port = next((p for p in spec.get("ports", []) if p["port"] == port), None)
    if service_port is None:
        problems.append(f"{name} has no port {port}")
        return problems
    # A headless Service's DNS answers are pod IPs: clients dial the target's port on the pod directly.
    target_port = _port_number(service_port.get("targetPort", port), backend.container)
    if target_port != port:
        problems.append(f"{name} maps port {port} to {service_port.get('targetPort')!r}, but through a headless "
                        f"Service clients reach the pods on {port} itself")
    return problems


def _cassandra_problems(container: OneCdpContainer, settings: CassandraSettings,
                        resources: list[Resource]) -> list[Problem]:
    """The contact points name the Cassandra this overlay deploys, in its data center, with enough nodes."""
    problems = []
    for contact_point in settings.contact_points:
        if _is_loopback(contact_point):
            problems.append(f"CASSANDRA_CONTACT_POINTS is {contact_point}: in a pod that is the pod itself")
            continue
        host = _CLUSTER_SERVICE.match(contact_point)
        if host is None:
            continue  # an address outside the cluster: nothing here to compare it with
        nodes, datacenter = _cassandra_behind(host["service"], host["namespace"], settings.port, resources)
        if nodes is None:
            problems.append(f"CASSANDRA_CONTACT_POINTS names {contact_point}, which is neither a Service with "
                            f"port {settings.port} nor one a CassandraDatacenter here creates")
            continue
        if datacenter is not None and datacenter != settings.local_dc:
            problems.append(f"CASSANDRA_LOCAL_DC is {settings.local_dc!r} but the datacenter is {datacenter!r}")
        if settings.replication_factor > nodes:
            problems.append(f"CASSANDRA_REPLICATION_FACTOR {settings.replication_factor} > {nodes} Cassandra nodes")
    return [Problem(container.where, message) for message in problems]


def _cassandra_behind(service: str, namespace: str, port: int,
                      resources: list[Resource]) -> tuple[int | None, str | None]:
    """(nodes, datacenter name if known) of the Cassandra a Service name leads to."""
    for datacenter in resources:
        if datacenter.get("kind") != "CassandraDatacenter" or datacenter["metadata"].get("namespace") != namespace:
            continue
        dc_name = datacenter["spec"].get("datacenterName") or datacenter["metadata"]["name"]
        # cass-operator's CQL Service: <clusterName>-<datacenter>-service, lower-cased, spaces to dashes.
        generated = f"{datacenter['spec']['clusterName']}-{dc_name}-service".lower().replace(" ", "-")
        if generated == service:
            return int(datacenter["spec"]["size"]), dc_name
    found = _find(resources, "Service", service)
    if found is None or found["metadata"].get("namespace") != namespace:
        return None, None
    if not any(p["port"] == port for p in found["spec"].get("ports", [])):
        return None, None
    for workload in resources:
        if workload.get("kind") == "StatefulSet" and _selects(
                {"matchLabels": found["spec"].get("selector", {})},
                _pod_template(workload).get("metadata", {}).get("labels", {})):
            return int(workload["spec"].get("replicas", 1)), None
    return None, None


# --- helpers ----------------------------------------------------------------------------------------------


def _name(resource: Resource) -> str:
    return f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"


def _pod_template(workload: Resource) -> dict[str, Any]:
    if workload.get("kind") == "Pod":
        return workload
    if workload.get("kind") == "CronJob":
        template: dict[str, Any] = workload["spec"]["jobTemplate"]["spec"]["template"]
        return template
    template = workload.get("spec", {}).get("template", {})
    return template


def _find(resources: list[Resource], kind: str, name: str) -> Resource | None:
    return next((r for r in resources if r.get("kind") == kind and r["metadata"]["name"] == name), None)


def _data_of(resource: Resource) -> dict[str, str | None]:
    if resource.get("kind") == "Secret":
        # Secret values stay unread: only their names are checked.
        return dict.fromkeys([*resource.get("data", {}), *resource.get("stringData", {})])
    return {key: str(value) for key, value in resource.get("data", {}).items()}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    match_labels: dict[str, str] = selector.get("matchLabels", {})
    return bool(match_labels) and all(labels.get(key) == value for key, value in match_labels.items())


def _port_number(port: int | str, container: dict[str, Any]) -> int | None:
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- the whole check --------------------------------------------------------------------------------------


def check_resources(name: str, resources: list[Resource]) -> CheckedOverlay:
    problems, skipped = schema_problems(resources)
    containers, container_problems = onecdp_containers(resources)
    problems += container_problems
    problems += settings_problems(containers, resources)
    problems += wiring_problems(containers, resources)
    return CheckedOverlay(name, resources, skipped, problems)


def check_overlays(directories: list[Path] | None = None) -> Iterator[CheckedOverlay]:
    for directory in directories if directories is not None else overlay_dirs():
        yield check_resources(directory.name, render(directory))


def _dump(resources: list[Resource]) -> str:
    dumped: str = yaml.safe_dump_all(resources, sort_keys=False)
    return dumped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render and check the OneCDP Kubernetes overlays offline.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="render every overlay in k8s/overlays and check it")
    render_parser = commands.add_parser("render", help="print one rendered overlay")
    render_parser.add_argument("overlay", choices=[d.name for d in overlay_dirs()])
    args = parser.parse_args(argv)
    console = Console()
    if args.command == "render":
        print(_dump(render(OVERLAYS_DIR / args.overlay)), end="")
        return 0
    table = Table(title=f"k8s/overlays, checked against Kubernetes {' and '.join(KUBERNETES_VERSIONS)}")
    for column in ("overlay", "objects", "custom resources (CRD fields checked)", "problems"):
        table.add_column(column)
    failed: list[CheckedOverlay] = []
    for checked in check_overlays():
        table.add_row(checked.name, str(len(checked.resources)), ", ".join(checked.skipped_custom_resources) or "-",
                      str(len(checked.problems)), style="red" if checked.problems else None)
        if checked.problems:
            failed.append(checked)
    console.print(table)
    for checked in failed:
        for problem in checked.problems:
            console.print(f"[red]{checked.name}[/red] {problem}", highlight=False, soft_wrap=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
