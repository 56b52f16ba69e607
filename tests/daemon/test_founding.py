"""Founding a consortium as a real one is founded: each member's secrets made on its own machine.

``keys init`` at each member, ``consortium init --members`` at the founder from their public
halves, each member taking the genesis, the CA certificate and its own certificate: the
founder never holds a member's private key, and the consortium runs on TLS by default.
"""

import json
import os

import pytest
import trio

from ehrnode import crypto, synthetic
from ehrnode.client import ApiClient
from ehrnode.config import Address, load_node_config
from ehrnode.consortium import found_consortium, keys_init
from ehrnode.errors import ConfigError
from ehrnode.localnet import LocalConsortium
from ehrnode.records.fhir import Item
from ehrnode.records.submit import add_items
from tests.commands import cli

PRIVATE = {"signing.pem", "sealing.pem", "master.key", "tls.key", "consortium.key"}



def test_each_member_holds_only_its_own_secrets_and_the_consortium_runs_on_tls(tmp_path):
    cluster = LocalConsortium(tmp_path / "c", founded=True)
    try:
        founding = tmp_path / "c" / "founding"
        held = {p.name for p in founding.rglob("*") if p.is_file()}
        assert not held & PRIVATE and held == {"genesis.toml", "ca.pem", "ca.key", "A.pem", "B.pem", "C.pem", "R.pem"}
        for name in cluster.names:
            keys = tmp_path / "c" / name / "keys"
            assert {p.name for p in keys.iterdir()} <= PRIVATE | {"tls.pem"}
            assert oct(keys.stat().st_mode & 0o777) == "0o700"
            assert cluster.configs[name].tls is not None
            signing = crypto.Identity.load(keys / "signing.pem")
            assert cluster.genesis.member(name).signing_key == signing.public_key
        assert not (tmp_path / "c" / "A" / "keys" / "consortium.key").exists()  # opened at first start
        cluster.start_all()
        trio.run(cluster.wait_ready)
        keys = {n: (tmp_path / "c" / n / "keys" / "consortium.key") for n in ("A", "B", "C")}
        assert len({k.read_bytes() for k in keys.values()}) == 1
        assert all(oct(k.stat().st_mode & 0o777) == "0o600" for k in keys.values())
        assert not (tmp_path / "c" / "R" / "keys" / "consortium.key").exists()  # the regulator holds none
        assert '"keys.consortium_key_installed"' in cluster.log("A")

        # Institutions record and find each other's patients: they hold the same EMPI key.
        person = synthetic.people(1, seed=11)[0]

        async def record(name):
            resources = synthetic.patient_resources(person, name, visits=1, seed=11)
            async with ApiClient.connect(cluster.configs[name]) as client:
                out = await add_items(client, [Item(f"in:{i}", r) for i, r in enumerate(resources)], timeout=60)
            return {r["empi"] for r in out.records if r["resource_type"] == "Patient"}

        assert trio.run(record, "A") == trio.run(record, "B")
    finally:
        cluster.stop_all()


def test_keys_init_prints_the_public_half_only_and_founding_checks_what_it_is_given(tmp_path):
    made = cli("keys", "init", "--name", "HospA", "--address", "127.0.0.1:7100", "--out", tmp_path / "a", "--json")
    assert made.returncode == 0, made.stderr
    shown = json.loads(made.stdout)
    assert set(shown) == {"name", "role", "signing_key", "sealing_key", "address", "config", "member_file"}
    for secret in ("master.key", "signing.pem", "sealing.pem", "tls.key"):
        assert oct(os.stat(tmp_path / "a" / "keys" / secret).st_mode & 0o777) == "0o600"
    config = load_node_config(tmp_path / "a" / "node.toml")
    assert config.peer_listen.host == "127.0.0.1" and config.tls is not None
    assert config.consortium_key_path == tmp_path / "a" / "keys" / "consortium.key"
    again = cli("keys", "init", "--name", "HospA", "--address", "127.0.0.1:7100", "--out", tmp_path / "a")
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr

    keys_init(tmp_path / "r", "Reg", "regulator", Address("127.0.0.1", 7101))
    # A certificate request in another member's name is refused.
    forged = json.loads((tmp_path / "r" / "member.json").read_text())
    forged["tls_request"] = json.loads((tmp_path / "a" / "member.json").read_text())["tls_request"]
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    with pytest.raises(ConfigError, match="names another member"):
        found_consortium(tmp_path / "f1", [tmp_path / "a" / "member.json", tmp_path / "forged.json"])
    assert not (tmp_path / "f1").exists()  # refused before anything was written: it can be run again
    broken = {**forged, "tls_request": "-----BEGIN CERTIFICATE REQUEST-----\nnäh\n"}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match="does not parse"):
        found_consortium(tmp_path / "f1", [tmp_path / "a" / "member.json", tmp_path / "broken.json"])
    with pytest.raises(ConfigError, match="at least one institution"):
        found_consortium(tmp_path / "f2", [tmp_path / "r" / "member.json"])
    founded = cli("consortium", "init", tmp_path / "f3", "--members", tmp_path / "a" / "member.json",
                  tmp_path / "r" / "member.json", "--json")
    assert founded.returncode == 0, founded.stderr
    assert {m["name"] for m in json.loads(founded.stdout)["members"]} == {"HospA", "Reg"}


def test_all_in_one_init_says_it_is_for_tests_and_tls_is_the_default(tmp_path):
    made = cli("consortium", "init", tmp_path / "one", "--institutions", "A,B", "--regulator", "R")
    assert made.returncode == 0, made.stderr
    assert "every member's private keys were made here" in made.stderr
    assert load_node_config(tmp_path / "one" / "A" / "node.toml").tls is not None
    plain = cli("consortium", "init", tmp_path / "two", "--institutions", "A,B", "--regulator", "R", "--no-tls")
    assert plain.returncode == 0 and load_node_config(tmp_path / "two" / "A" / "node.toml").tls is None
