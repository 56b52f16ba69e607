import dataclasses
import json
import stat
import subprocess
import sys

import pytest
import tomli_w

from ehrnode import codec, crypto
from ehrnode.config import LEDGER_RULES, load_genesis, load_node_config
from ehrnode.consortium import init_consortium
from ehrnode.errors import ConfigError


def test_init_writes_private_keys_public_genesis_and_relative_node_configs(tmp_path):
    genesis = init_consortium(tmp_path / "c", ["A", "B", "C"], "R", base_port=17100)
    assert [m.name for m in genesis.members] == ["A", "B", "C", "R"]
    assert [m.role for m in genesis.members] == ["institution"] * 3 + ["regulator"]
    assert genesis.validators.n == 4 and genesis.validators.f == 1
    for i, member in enumerate(genesis.members):
        node_dir = tmp_path / "c" / member.name
        for key in ("signing.pem", "sealing.pem"):
            assert stat.S_IMODE((node_dir / "keys" / key).stat().st_mode) == 0o600
        assert stat.S_IMODE((node_dir / "keys").stat().st_mode) == 0o700
        config = load_node_config(node_dir / "node.toml")
        assert config.name == member.name and config.peer_listen.port == 17100 + i
        assert config.api_listen.port == 17200 + i
        assert config.fhir_listen is not None and config.fhir_listen.port == 17400 + i
        assert load_genesis(config.genesis_path).hash == genesis.hash
        assert crypto.Identity.load(config.signing_key_path).public_key == member.signing_key
        assert crypto.SealingKey.load(config.sealing_key_path).public_key == member.sealing_key
    assert "PRIVATE" not in (tmp_path / "c" / "genesis.toml").read_text()
    # The directory can move: every path in node.toml is relative to it.
    (tmp_path / "c").rename(tmp_path / "moved")
    assert load_node_config(tmp_path / "moved" / "A" / "node.toml").signing_key_path.exists()


def test_init_never_overwrites_existing_keys(tmp_path):
    init_consortium(tmp_path, ["A"], "R")
    before = (tmp_path / "A" / "keys" / "signing.pem").read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        init_consortium(tmp_path, ["A"], "R")
    assert (tmp_path / "A" / "keys" / "signing.pem").read_bytes() == before


@pytest.mark.parametrize("institutions, regulator, message", [
    (["A", "A"], "R", "distinct"),
    (["A"], "A", "distinct"),
    (["bad name"], "R", "member name"),
    ([], "R", "at least one institution"),
])
def test_init_refuses_bad_member_lists(tmp_path, institutions, regulator, message):
    with pytest.raises(ConfigError, match=message):
        init_consortium(tmp_path / "c", institutions, regulator)
    assert not (tmp_path / "c").exists()


def test_config_errors_name_the_file_and_field(tmp_path):
    init_consortium(tmp_path, ["A"], "R")
    node = tmp_path / "A" / "node.toml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_node_config(tmp_path / "nope.toml")
    node.write_text(node.read_text().replace('listen = "127.0.0.1:7100"', 'listen = "127.0.0.1:99999"'))
    with pytest.raises(ConfigError, match=r"\[peer\] listen"):
        load_node_config(node)
    node.write_text("name = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_node_config(node)
    genesis = tmp_path / "genesis.toml"
    genesis.write_text(genesis.read_text().replace('role = "regulator"', 'role = "king"'))
    with pytest.raises(ConfigError, match="role must be one of"):
        load_genesis(genesis)


def test_the_fhir_interface_is_on_by_default_and_can_be_moved_or_turned_off(tmp_path):
    init_consortium(tmp_path, ["A"], "R", base_port=7100)
    node = tmp_path / "A" / "node.toml"
    written = node.read_text()
    assert '[fhir]\nlisten = "127.0.0.1:7400"' in written
    without = written.replace('[fhir]\nlisten = "127.0.0.1:7400"\n', "")
    node.write_text(without)
    assert str(load_node_config(node).fhir_listen) == "127.0.0.1:7400"  # the API's host, its port + 200
    node.write_text(without + '\n[fhir]\nenabled = false\n')
    assert load_node_config(node).fhir_listen is None
    assert "enabled = false" in tomli_w.dumps(load_node_config(node).to_toml_dict())
    node.write_text(without + '\n[fhir]\nbase_url = "https://hospa.example.org:7400/fhir/"\n')
    assert load_node_config(node).fhir_base_url == "https://hospa.example.org:7400/fhir"
    assert "base_url" in tomli_w.dumps(load_node_config(node).to_toml_dict())
    for bad, message in (('listen = "nowhere"', r"\[fhir\] listen"), ('enabled = "yes"', "true or false"),
                         ('port = 1', "no setting port"), ('base_url = "ftp://x/fhir"', "http:// or https://")):
        node.write_text(without + f"\n[fhir]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_node_config(node)


def test_record_workers_start_with_the_node_unless_told_and_records_settings_are_checked(tmp_path):
    init_consortium(tmp_path, ["A"], "R", base_port=7100)
    node = tmp_path / "A" / "node.toml"
    written = node.read_text()
    assert load_node_config(node).record_prestart is True
    node.write_text(written + "\n[records]\nworkers = 3\nprestart = false\n")
    config = load_node_config(node)
    assert (config.record_workers, config.record_prestart) == (3, False)
    assert "prestart = false" in tomli_w.dumps(config.to_toml_dict())
    for bad, message in (("prestart = 1", "prestart must be true or false"), ("workers = -1", "workers must be"),
                         ("prestrat = false", r"\[records\]: unknown setting\(s\) prestrat")):
        node.write_text(written + f"\n[records]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_node_config(node)


def test_genesis_refuses_a_key_listed_twice(tmp_path):
    init_consortium(tmp_path, ["A", "B"], "R")
    genesis = tmp_path / "genesis.toml"
    text = genesis.read_text()
    a_key = load_genesis(genesis).members[0].signing_key.hex()
    b_key = load_genesis(genesis).members[1].signing_key.hex()
    genesis.write_text(text.replace(b_key, a_key))
    with pytest.raises(ConfigError, match="share a signing key"):
        load_genesis(genesis)


def test_cli_consortium_init(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "ehrnode.cli", "consortium", "init", str(tmp_path / "c"), "--institutions", "A,B,C",
         "--regulator", "R", "--base-port", "18100", "--json"], capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert [m["name"] for m in doc["members"]] == ["A", "B", "C", "R"]
    again = subprocess.run(
        [sys.executable, "-m", "ehrnode.cli", "consortium", "init", str(tmp_path / "c"), "--institutions", "A,B,C",
         "--regulator", "R"], capture_output=True, text=True,
    )
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr and again.stderr.count("\n") == 1


def test_genesis_names_its_ledger_rules_and_one_from_before_keeps_its_hash(tmp_path):
    genesis = init_consortium(tmp_path / "c", ["A", "B", "C"], "R", base_port=17300)
    path = tmp_path / "c" / "genesis.toml"
    assert genesis.rules == LEDGER_RULES == load_genesis(path).rules
    assert f"rules = {LEDGER_RULES}" in path.read_text()
    # A genesis written before rules were named: rules 1, and the hash it always had.
    old = dataclasses.replace(genesis, rules=1)
    assert "rules" not in old.to_toml_dict()
    assert old.hash == crypto.sha256(codec.encode(
        {k: v for k, v in genesis.to_toml_dict().items() if k != "rules"}))
    text = path.read_text()
    path.write_text(text.replace(f"rules = {LEDGER_RULES}\n", ""))
    assert load_genesis(path).rules == 1 and load_genesis(path).hash == old.hash
    for bad, message in ((LEDGER_RULES + 1, "upgrade it"), (0, "positive whole number"), ('"2"', "whole number")):
        path.write_text(text.replace(f"rules = {LEDGER_RULES}", f"rules = {bad}"))
        with pytest.raises(ConfigError, match=message):
            load_genesis(path)
