"""Client channels: deadlines on every call, retries only where a repeat is harmless."""

from __future__ import annotations

import json

import pytest
from onecdp.identity.v1 import identity_service_pb2
from onecdp.profile.v1 import profile_service_pb2

from shared.clients import is_idempotent, service_config

pytestmark = pytest.mark.unit

IDENTITY = identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"]
PROFILE = profile_service_pb2.DESCRIPTOR.services_by_name["ProfileService"]


def _configs_by_method(config: dict[str, object]) -> dict[str, dict[str, object]]:
    by_method = {}
    for method_config in config["methodConfig"]:  # type: ignore[attr-defined]
        for name in method_config["name"]:
            by_method[name["method"]] = method_config
    return by_method


def test_reads_and_keyed_writes_retry_on_unavailable_others_do_not() -> None:
    config = json.loads(service_config([IDENTITY, PROFILE], timeout_seconds=2.5))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    by_method = _configs_by_method(config)
    for method in ("LookupPerson", "LinkIdentifiers", "IngestEvents", "GetProfile", "ListProfileChanges"):
        assert by_method[method]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]  # type: ignore[index]
        assert by_method[method]["timeout"] == "2.500s"
    for method in ("UnlinkIdentifiers", "ErasePerson", "CreateIdentifierType"):
        assert "retryPolicy" not in by_method[method]
        assert by_method[method]["timeout"] == "2.500s"


def test_streams_are_not_cut_by_the_unary_deadline_and_client_streams_never_retry() -> None:
    by_method = _configs_by_method(json.loads(service_config([IDENTITY, PROFILE], timeout_seconds=1)))
    assert "timeout" not in by_method["WatchIdentityChanges"]
    assert "StreamIngestEvents" not in by_method or "retryPolicy" not in by_method["StreamIngestEvents"]


def test_idempotence_rule() -> None:
    assert is_idempotent("GetProfile") and is_idempotent("BatchScorePersons") and is_idempotent("IngestEvents")
    assert not is_idempotent("ErasePerson") and not is_idempotent("TrainModel")
