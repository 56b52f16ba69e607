"""Setting up a consortium: keys for every member, the shared genesis, each node's config.

``init_consortium`` writes, under one directory::

    genesis.toml              public: chain id, members, public keys, peer addresses, the
                              epoch 0 key sealed to each member
    <name>/node.toml          that member's node configuration (paths relative to itself)
    <name>/keys/signing.pem   Ed25519 private key, mode 0600
    <name>/keys/sealing.pem   X25519 private key, mode 0600
    <name>/keys/master.key    the member's own records secret (vault, de-identification), 0600
    <name>/keys/consortium.key  institutions only: the shared EMPI pseudonym key, 0600
    ca/ca.pem, ca/ca.key      with ``tls``: the consortium CA (keep ca.key offline)
    <name>/keys/tls.pem, tls.key  with ``tls``: the member's certificate from that CA, and its key

In a real deployment each institution generates its own keys on its own
machine and sends only the public half; this command is for a consortium whose
members are all set up from one place (a test bed, the demo, a pilot).

``new_member`` is that first step for a member joining later: on its own
machine it writes the member's keys and ``node.toml`` (pointing at the
consortium's public ``genesis.toml``) and ``member.json``, the public half the
member hands to a current member to propose it (``ehrnode consortium propose
add``). Its node can start at once: it follows the chain, and takes part once
the proposal is adopted.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import tomli_w

from . import crypto
from .ledger.epochs import EpochGrant
from .config import ROLES, Address, Genesis, Member, NodeConfig, TlsFiles, check_name, load_genesis
from .errors import ConfigError
from .net.tls import create_ca, issue
from .records.keys import create_secret

GENESIS_FILE = "genesis.toml"
NODE_FILE = "node.toml"
API_PORT_OFFSET = 100
METRICS_PORT_OFFSET = 200


def init_consortium(
    directory: Path, institutions: Sequence[str], regulator: str, *, host: str = "127.0.0.1", base_port: int = 7100,
    hosts: Sequence[str] | None = None, tls: bool = False,
) -> Genesis:
    """Create keys and configuration for every member; refuses to overwrite anything that exists.

    ``hosts`` gives each member (institutions, then the regulator) its own host; members on
    different hosts all use ``base_port``. Without it, every member is on ``host`` with
    consecutive ports.
    """
    directory = Path(directory)
    names = [check_name(n, "--institutions") for n in institutions] + [check_name(regulator, "--regulator")]
    if not institutions:
        raise ConfigError("a consortium needs at least one institution")
    if len(set(names)) != len(names):
        raise ConfigError(f"member names must be distinct: {', '.join(names)}")
    if not 0 < base_port or base_port + METRICS_PORT_OFFSET + len(names) > 65535:
        raise ConfigError(f"--base-port {base_port} leaves no room for {len(names)} peer and API ports")
    if hosts is not None and len(hosts) != len(names):
        raise ConfigError(f"--hosts lists {len(hosts)} hosts for {len(names)} members")
    existing = [p for p in [directory / GENESIS_FILE] + [directory / n for n in names] if p.exists()]
    if existing:
        raise ConfigError(f"refusing to overwrite existing {existing[0]} (keys are never replaced)")

    if tls and (directory / "ca").exists():
        raise ConfigError(f"refusing to overwrite existing {directory / 'ca'} (keys are never replaced)")
    directory.mkdir(parents=True, exist_ok=True)
    consortium_secret = os.urandom(32)
    chain_id = f"ehrnode-{secrets.token_hex(8)}"
    ca = create_ca(directory / "ca", chain_id) if tls else None
    members = []
    configs = []
    for i, name in enumerate(names):
        peer = Address(hosts[i], base_port) if hosts is not None else Address(host, base_port + i)
        config, identity, sealing = _member_files(
            directory, name, directory / GENESIS_FILE, peer, consortium_secret if name != regulator else None, ca)
        members.append(Member(
            name, "regulator" if name == regulator else "institution", identity.public_key, sealing.public_key, peer,
        ))
        configs.append(config)
    grant = EpochGrant.create(chain_id, 0, {m.name: m.sealing_key for m in members})
    genesis = Genesis(chain_id, tuple(members), grant)
    _write_toml(directory / GENESIS_FILE, genesis.to_toml_dict(),
                "# Consortium genesis: public keys, addresses, and the first epoch key sealed to each member.\n"
                "# Identical at every member.\n")
    for config in configs:
        # Paths are written relative to node.toml, so the directory can move as a whole.
        _write_toml(config.path, config.to_toml_dict(), f"# ehrnode node configuration for {config.name}\n")
    return genesis


MEMBER_FILE = "member.json"


def new_member(
    directory: Path, genesis_path: Path, name: str, role: str, address: Address, *,
    consortium_key: Path | None = None, ca: Path | None = None,
) -> tuple[NodeConfig, Member]:
    """Keys and configuration for a member that joins an existing consortium (see above).

    An institution needs the consortium's EMPI pseudonym key (``consortium_key``, a copy of
    another institution's ``consortium.key`` handed over off the chain); ``ca``: the directory
    of the consortium CA, to issue the member's TLS certificate.
    """
    directory = Path(directory)
    name = check_name(name, "--name")
    if role not in ROLES:
        raise ConfigError(f"--role: one of {', '.join(ROLES)}")
    if role == "institution" and consortium_key is None:
        raise ConfigError("an institution needs --consortium-key: a copy of the consortium's EMPI pseudonym key")
    genesis = load_genesis(genesis_path)
    if any(m.name == name for m in genesis.members):
        raise ConfigError(f"{name!r} is a founding member of {genesis.chain_id}")
    if (directory / name).exists():
        raise ConfigError(f"refusing to overwrite existing {directory / name} (keys are never replaced)")
    secret = b""
    if consortium_key is not None:
        try:
            secret = Path(consortium_key).read_bytes()
        except OSError as exc:
            raise ConfigError(f"--consortium-key: cannot read {consortium_key}: {exc.strerror}") from exc
        if len(secret) != 32:
            raise ConfigError(f"--consortium-key: {consortium_key} holds {len(secret)} bytes, not the consortium's "
                              "32-byte EMPI pseudonym key")
    ca_files = (Path(ca) / "ca.pem", Path(ca) / "ca.key") if ca is not None else None
    config, identity, sealing = _member_files(directory, name, Path(genesis_path).absolute(), address,
                                              secret or None, ca_files)
    _write_toml(config.path, config.to_toml_dict(), f"# ehrnode node configuration for {name}\n")
    member = Member(name, role, identity.public_key, sealing.public_key, address)
    (directory / name / MEMBER_FILE).write_text(json.dumps(member_json(member), indent=2) + "\n", encoding="utf-8")
    return config, member


def _member_files(directory: Path, name: str, genesis_path: Path, peer: Address, consortium_secret: bytes | None,
                  ca: tuple[Path, Path] | None) -> tuple[NodeConfig, crypto.Identity, crypto.SealingKey]:
    """One member's keys directory (0700: signing and sealing keys, its records secret, for an
    institution the consortium's EMPI pseudonym key, with ``ca`` a TLS certificate) and its node
    configuration (returned, not written)."""
    keys = directory / name / "keys"
    keys.mkdir(parents=True, mode=0o700)
    os.chmod(keys, 0o700)
    identity, sealing = crypto.Identity.generate(), crypto.SealingKey.generate()
    identity.save(keys / "signing.pem")
    sealing.save(keys / "sealing.pem")
    create_secret(keys / "master.key")
    if consortium_secret is not None:
        crypto.write_secret_file(keys / "consortium.key", consortium_secret)
    tls_files = None
    if ca is not None:
        issue(*ca, name, keys / "tls.pem", keys / "tls.key")
        tls_files = TlsFiles(ca[0], keys / "tls.pem", keys / "tls.key")
    config = NodeConfig(
        path=directory / name / NODE_FILE, name=name, genesis_path=genesis_path, data_dir=directory / name / "data",
        signing_key_path=keys / "signing.pem", sealing_key_path=keys / "sealing.pem",
        peer_listen=peer, api_listen=Address("127.0.0.1", peer.port + API_PORT_OFFSET),
        log_level="info", metrics_listen=Address("127.0.0.1", peer.port + METRICS_PORT_OFFSET),
        master_key_path=keys / "master.key",
        consortium_key_path=keys / "consortium.key" if consortium_secret is not None else None, tls=tls_files,
    )
    return config, identity, sealing


def member_json(member: Member) -> dict[str, str]:
    return {"name": member.name, "role": member.role, "signing_key": member.signing_key.hex(),
            "sealing_key": member.sealing_key.hex(), "address": str(member.address)}


def _write_toml(path: Path, doc: dict, header: str) -> None:
    path.write_text(header + tomli_w.dumps(doc), encoding="utf-8")
