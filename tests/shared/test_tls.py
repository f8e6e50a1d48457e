"""Mutual TLS between services: only clients with a certificate from our CA get through.

A throwaway PKI is made per module with the `openssl` command line (two CAs: ours and a rogue one),
a real server is started with mTLS on a free port, and real channels call it. The plaintext health
port, which Kubernetes' probes use because they cannot present a client certificate, answers health
and nothing else, and follows the graceful-shutdown state.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError

from shared.clients import open_channel
from shared.config import GrpcSettings
from shared.server import RunningServer, create_server

pytestmark = pytest.mark.unit

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
CALL_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Identity:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Identity
    client: Identity
    rogue_ca: Path
    rogue_client: Identity


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(directory: Path, name: str) -> Identity:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=directory)
    return Identity(cert, key)


def _issue(directory: Path, ca: Identity, name: str, subject_alt_names: str) -> Identity:
    """A leaf certificate for both TLS roles, like the one each service pod mounts."""
    cert, key, csr = directory / f"{name}.crt", directory / f"{name}.key", directory / f"{name}.csr"
    extensions = directory / f"{name}.ext"
    extensions.write_text("basicConstraints=critical,CA:FALSE\n"
                          "keyUsage=critical,digitalSignature\n"
                          "extendedKeyUsage=serverAuth,clientAuth\n"
                          f"subjectAltName={subject_alt_names}\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=directory)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
             "-days", "1", "-extfile", str(extensions), "-out", str(cert), cwd=directory)
    return Identity(cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ours, rogue = _make_ca(directory, "onecdp-ca"), _make_ca(directory, "rogue-ca")
    return Pki(
        ca=ours.cert,
        server=_issue(directory, ours, "server", "DNS:localhost,IP:127.0.0.1"),
        client=_issue(directory, ours, "client", "DNS:client.onecdp.svc.cluster.local"),
        rogue_ca=rogue.cert,
        rogue_client=_issue(directory, rogue, "rogue-client", "DNS:client.onecdp.svc.cluster.local"),
    )


def _mtls_settings(identity: Identity, ca: Path, health_port: int | None = None) -> GrpcSettings:
    return GrpcSettings(bind_host="127.0.0.1", grace_period_seconds=1.0, log_format="text",
                        tls_cert_file=identity.cert, tls_key_file=identity.key, tls_ca_file=ca,
                        health_port=health_port)


@pytest.fixture
def server(pki: Pki) -> Iterator[RunningServer]:
    running = create_server([], _mtls_settings(pki.server, pki.ca, health_port=0), port=0,
                            error_domain="onecdp.test")
    yield running
    running.stop(None).wait()


def _check(channel: grpc.Channel) -> str:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=CALL_TIMEOUT_SECONDS)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def _refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        _check(channel)
    code: grpc.StatusCode = raised.value.code()
    return code


def test_a_client_with_a_certificate_from_our_ca_is_served(pki: Pki, server: RunningServer) -> None:
    # The same path services use to call each other: shared.clients with the ONECDP_TLS_* settings.
    settings = _mtls_settings(pki.client, pki.ca)
    channel = open_channel(f"localhost:{server.port}", [HEALTH_SERVICE], settings)
    try:
        assert _check(channel) == "SERVING"
    finally:
        channel.close()


def test_a_client_without_a_certificate_is_refused(pki: Pki, server: RunningServer) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
        assert _refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_a_client_with_a_certificate_from_another_ca_is_refused(pki: Pki, server: RunningServer) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes(),
                                               private_key=pki.rogue_client.key.read_bytes(),
                                               certificate_chain=pki.rogue_client.cert.read_bytes())
    with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
        assert _refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_a_plaintext_client_is_refused_on_the_service_port(server: RunningServer) -> None:
    with grpc.insecure_channel(f"localhost:{server.port}") as channel:
        assert _refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_a_client_does_not_trust_a_server_outside_its_ca(pki: Pki, server: RunningServer) -> None:
    # Mutual: our client, trusting only the rogue CA, must refuse our server's certificate.
    settings = _mtls_settings(pki.client, pki.rogue_ca)
    channel = open_channel(f"localhost:{server.port}", [HEALTH_SERVICE], settings)
    try:
        assert _refused(channel) == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()


def test_the_health_port_answers_probes_in_plaintext_and_serves_nothing_else(server: RunningServer) -> None:
    assert server.health_port is not None and server.health_port != server.port
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        assert _check(channel) == "SERVING"
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        with pytest.raises(grpc.RpcError) as raised:
            list(reflection.ServerReflectionInfo(requests, timeout=CALL_TIMEOUT_SECONDS))
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # SIGTERM's first step: the probe sees NOT_SERVING on the health port at once.
        server.enter_graceful_shutdown()
        assert _check(channel) == "NOT_SERVING"


def test_stopping_closes_the_health_port_too(pki: Pki) -> None:
    running = create_server([], _mtls_settings(pki.server, pki.ca, health_port=0), port=0,
                            error_domain="onecdp.test")
    assert running.stop(0.5).wait(timeout=10)
    with grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as channel:
        assert _refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_come_as_a_set(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="set together"):
        GrpcSettings(tls_cert_file=pki.server.cert, tls_key_file=pki.server.key)
    # Blank entries (e.g. in a ConfigMap) mean "not set": plaintext, no health port.
    for name in ("ONECDP_TLS_CERT_FILE", "ONECDP_TLS_KEY_FILE", "ONECDP_TLS_CA_FILE", "ONECDP_HEALTH_PORT"):
        monkeypatch.setenv(name, "")
    plaintext = GrpcSettings()
    assert plaintext.tls_files() is None and plaintext.health_port is None
    monkeypatch.setenv("ONECDP_TLS_CERT_FILE", str(pki.server.cert))
    with pytest.raises(ValidationError, match="set together"):
        GrpcSettings()


def test_a_missing_certificate_file_fails_at_start_naming_it(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "absent.crt"
    settings = _mtls_settings(pki.server, pki.ca).model_copy(update={"tls_cert_file": missing})
    with pytest.raises(OSError, match=str(missing)):
        create_server([], settings, port=0, error_domain="onecdp.test")
