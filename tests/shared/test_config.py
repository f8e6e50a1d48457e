"""Settings come from the environment, typed, with mistakes refused at start-up."""

from __future__ import annotations

import pydantic
import pytest

from shared.config import SERVICE_NAMES, CassandraSettings, GrpcSettings, env_var_names

pytestmark = pytest.mark.unit


def test_contact_points_are_read_as_comma_separated_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASSANDRA_CONTACT_POINTS", "10.0.0.1, 10.0.0.2,")
    monkeypatch.setenv("CASSANDRA_CONSISTENCY", "QUORUM")
    settings = CassandraSettings()
    assert settings.contact_points == ["10.0.0.1", "10.0.0.2"]
    assert settings.consistency == "QUORUM"


def test_unknown_consistency_and_bad_prefix_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASSANDRA_CONSISTENCY", "MOSTLY")
    with pytest.raises(pydantic.ValidationError, match="consistency"):
        CassandraSettings()
    monkeypatch.delenv("CASSANDRA_CONSISTENCY")
    with pytest.raises(pydantic.ValidationError, match="keyspace_prefix"):
        CassandraSettings(keyspace_prefix="Drop Table")


def test_each_service_owns_a_keyspace() -> None:
    settings = CassandraSettings(keyspace_prefix="acme")
    assert [settings.keyspace(s) for s in SERVICE_NAMES] == [
        "acme_identity", "acme_profile", "acme_segmentation", "acme_prediction"]


def test_targets_default_to_local_ports_and_follow_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONECDP_PROFILE_PORT", "6000")
    monkeypatch.setenv("ONECDP_IDENTITY_TARGET", "dns:///identity.onecdp.svc.cluster.local:50051")
    settings = GrpcSettings()
    assert settings.target_of("profile") == "localhost:6000"
    assert settings.target_of("identity") == "dns:///identity.onecdp.svc.cluster.local:50051"
    with pytest.raises(ValueError, match="unknown service"):
        settings.port_of("billing")


def test_env_var_names_lists_what_the_settings_read() -> None:
    names = env_var_names()
    assert {"CASSANDRA_CONTACT_POINTS", "CASSANDRA_LOCAL_DC", "ONECDP_IDENTITY_PORT",
            "ONECDP_GRACE_PERIOD_SECONDS", "ONECDP_MIGRATE_ON_START"} <= names
    assert all(name.isupper() for name in names)
