"""The Cassandra launcher: the config it writes, and the real node the test session runs on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from deploy import cassandra as launcher
from shared.cassandra import CassandraSession


@pytest.mark.unit
def test_three_node_cluster_has_balanced_tokens_on_distinct_loopback_addresses() -> None:
    nodes = launcher.nodes_of(3)
    assert [node.address for node in nodes] == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    tokens = [node.initial_token for node in nodes]
    assert tokens == sorted(tokens) and tokens[0] == -(2**63)
    gaps = {b - a for a, b in zip(tokens, [*tokens[1:], tokens[0] + 2**64], strict=True)}
    assert max(gaps) - min(gaps) <= 2  # evenly spaced around the ring
    homes = {node.home for node in nodes} | {launcher.Node(1, 1).home}
    assert len(homes) == 4  # a 1-node data dir never joins the 3-node ring


@pytest.mark.unit
def test_node_config_is_yaml_cassandra_accepts() -> None:
    config = launcher.node_config(launcher.Node(2, 3))
    json.dumps(config)  # written as JSON, which SnakeYAML reads as YAML
    assert config["listen_address"] == config["rpc_address"] == "127.0.0.2"
    assert config["native_transport_port"] == 9042
    assert config["seed_provider"][0]["parameters"][0]["seeds"] == "127.0.0.1:7000"  # type: ignore[index]
    assert config["crypto_provider"] == [{"class_name": "org.apache.cassandra.security.JREProvider"}]
    assert config["storage_compatibility_mode"] == "NONE"


@pytest.mark.unit
def test_fast_mode_flags_are_only_added_when_asked(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ONECDP_CACHE_DIR", str(tmp_path))
    (launcher.lib_dir()).mkdir(parents=True)
    (launcher.lib_dir() / "jamm-0.4.0.jar").touch()
    node = launcher.Node(1, 1)
    safe = launcher.java_command(node, fast=False)
    fast = launcher.java_command(node, fast=True)
    for fast_only in ("-Dcassandra.skip_sync=true", "-Dcassandra.commitlog.ignorereplayerrors=true"):
        assert fast_only not in safe and fast_only in fast
    assert f"-javaagent:{launcher.lib_dir() / 'jamm-0.4.0.jar'}" in safe
    assert "--add-opens=java.base/java.nio=ALL-UNNAMED" in safe
    assert safe[-1] == "org.apache.cassandra.service.CassandraDaemon"


@pytest.mark.unit
def test_heap_follows_cassandras_own_rule_for_a_node_alone_unless_configured(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("ONECDP_CASSANDRA_HEAP", raising=False)
    for ram_gib, heap in ((2, "1024M"), (8, "2048M"), (24, "6144M"), (64, "8192M")):
        pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": ram_gib * 2**18}
        monkeypatch.setattr(os, "sysconf", pages.__getitem__)
        assert launcher.heap_size(1) == heap, ram_gib
        assert launcher.heap_size(3) == "768M"
    monkeypatch.setenv("ONECDP_CASSANDRA_HEAP", "3G")
    assert launcher.heap_size(1) == launcher.heap_size(3) == "3G"


@pytest.mark.unit
def test_wipe_deletes_node_data_but_keeps_the_logs_of_the_last_nodes(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ONECDP_STATE_DIR", str(tmp_path))
    for wiped in ("first", "second"):
        node = launcher.Node(1, 1)
        (node.home / "logs").mkdir(parents=True)
        (node.home / "data").mkdir()
        node.log_file.write_text(f"{wiped} node's log\n")
        launcher.wipe()  # no pid file: nothing to stop
        assert not launcher.state_dir().exists()
        kept = launcher.last_logs_dir() / node.home.parent.name / node.home.name / "system.log"
        assert kept.read_text() == f"{wiped} node's log\n"


@pytest.mark.unit
def test_a_node_of_another_state_directory_starting_is_waited_for_not_raced(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Two nodes started side by side take the same ports: one dies at bind after minutes of loading. A
    Cassandra daemon of another state directory (here a stand-in process with its command line) is found,
    `ensure_running` waits for it rather than starting a second node, and `start` refuses, naming it."""
    monkeypatch.setenv("ONECDP_STATE_DIR", str(tmp_path / "ours"))
    elsewhere = str(tmp_path / "theirs" / "1-node" / "node1")
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                 f"-Dcassandra.storagedir={elsewhere}", "org.apache.cassandra.service.CassandraDaemon"])
    try:
        assert launcher.other_daemons().get(stand_in.pid) == elsewhere
        # As on a machine where nothing answers CQL yet (the stand-in never will) and nothing is to be fetched.
        monkeypatch.setattr(launcher, "is_running", lambda: False)
        monkeypatch.setattr(launcher.Node, "answers_cql", lambda node: False)
        monkeypatch.setattr(launcher, "fetch", lambda quiet=False: None)
        started = time.monotonic()
        with pytest.raises(launcher.CassandraError, match=f"another Cassandra runs on this machine .*pid "
                                                          f"{stand_in.pid}, data in {re.escape(elsewhere)}"):
            launcher.ensure_running(nodes=1, fast=True, timeout=1.5)
        assert time.monotonic() - started >= 1.4  # waited for it first
        assert not launcher.Node(1, 1).pid_file.exists()  # and launched nothing
    finally:
        stand_in.kill()
        stand_in.wait()
    assert stand_in.pid not in launcher.other_daemons()


@pytest.mark.integration
def test_the_session_runs_on_a_real_cassandra_5(admin_session: CassandraSession) -> None:
    row = admin_session.execute("SELECT release_version FROM system.local").one()
    major, minor, patch = (int(part) for part in row.release_version.split(".")[:3])
    assert (major, minor) == (5, 0) and patch >= 5
