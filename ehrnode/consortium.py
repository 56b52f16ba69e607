"""Setting up a consortium: each member's keys, the shared genesis, each node's config.

How a real consortium is founded, each institution keeping its own secrets::

    ehrnode keys init --name HospA --role institution --address hospa.example.org:7100 --out hospa/
        (at each member, on its own machine) hospa/keys/ (0700): signing.pem, sealing.pem,
        master.key, tls.key; hospa/node.toml; hospa/member.json, the public half (keys,
        address, and the TLS certificate request)
    ehrnode consortium init founding/ --members hospa.json hospb.json ... reg.json
        (at the founder) founding/genesis.toml: public keys, addresses, the epoch 0 key and the
        consortium's EMPI pseudonym key each sealed to every member it is for; with TLS (the
        default) founding/ca/ (ca.pem; ca.key, to keep offline) and founding/certs/<name>.pem
        signed from each member's request. No private key of any member is ever here.
    each member copies genesis.toml, ca/ca.pem and certs/<name>.pem beside its node.toml and
    runs it; on first start an institution opens its sealed copy of the EMPI key into
    keys/consortium.key.

``init_consortium`` does all of that in one directory for every member at once, private
keys included: for the demo, tests and a test bed on one machine, not for production.
It writes::

    genesis.toml              public: chain id, members, public keys, peer addresses, the
                              epoch 0 key sealed to each member
    <name>/node.toml          that member's node configuration (paths relative to itself)
    <name>/keys/signing.pem   Ed25519 private key, mode 0600
    <name>/keys/sealing.pem   X25519 private key, mode 0600
    <name>/keys/master.key    the member's own records secret (vault, de-identification), 0600
    <name>/keys/consortium.key  institutions only: the shared EMPI pseudonym key, 0600
    ca/ca.pem, ca/ca.key      with ``tls`` (the default): the consortium CA (keep ca.key offline)
    <name>/keys/tls.pem, tls.key  with ``tls``: the member's certificate from that CA, and its key

``new_member`` is the first step for a member joining later: on its own machine it
writes the member's keys and ``node.toml`` (pointing at the consortium's public
``genesis.toml``) and ``member.json``, the public half the member hands to a current
member to propose it (``ehrnode consortium propose add``). Its node can start at once:
it follows the chain, and takes part once the proposal is adopted.

``master.key`` never leaves its institution and is never rotated: it derives the keys of
every vault entry, pseudonym and date shift the institution ever made, so replacing it
would orphan them. It is backed up with the node (``ehrnode backup``, encrypted) and moved
only that way; see docs/security.md.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w

from . import crypto
from .config import (
    FHIR_FROM_API,
    LEDGER_RULES,
    ROLES,
    Address,
    Genesis,
    Member,
    NodeConfig,
    TlsFiles,
    check_distinct,
    check_name,
    load_genesis,
    parse_member,
)
from .epochs import EpochGrant
from .errors import ConfigError
from .net.tls import certificate, check_request, create_ca, issue, request
from .records.keys import create_secret

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

GENESIS_FILE = "genesis.toml"
NODE_FILE = "node.toml"
API_PORT_OFFSET = 100
METRICS_PORT_OFFSET = 200
FHIR_PORT_OFFSET = API_PORT_OFFSET + FHIR_FROM_API


def init_consortium(
    directory: Path, institutions: Sequence[str], regulator: str, *, host: str = "127.0.0.1", base_port: int = 7100,
    hosts: Sequence[str] | None = None, tls: bool = True,
) -> Genesis:
    """Create keys and configuration for every member, all in ``directory`` (for demos, tests and
    test beds: see above); refuses to overwrite anything that exists.

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
    if not 0 < base_port or base_port + FHIR_PORT_OFFSET + len(names) > 65535:
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
    genesis = Genesis(chain_id, tuple(members), grant, rules=LEDGER_RULES)
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


#: What a member's sealed copy of the consortium's EMPI key is bound to (with the chain id).
CONSORTIUM_KEY_CONTEXT = b"ehrnode/consortium-key/v1\x1f"
CERTS_DIR = "certs"


def keys_init(directory: Path, name: str, role: str, address: Address, *, tls: bool = True) -> tuple[NodeConfig,
                                                                                                   dict[str, str]]:
    """One member's own keys and node configuration, made on its own machine (see above).

    Writes ``directory/keys/`` (0700), ``directory/node.toml`` and ``directory/member.json``
    (the public half, with the TLS certificate request); refuses to overwrite anything.
    Returns the configuration and the public half.
    """
    directory = Path(directory)
    name = check_name(name, "--name")
    if role not in ROLES:
        raise ConfigError(f"--role: one of {', '.join(ROLES)}")
    if (directory / "keys").exists() or (directory / NODE_FILE).exists():
        raise ConfigError(f"refusing to overwrite existing keys or configuration in {directory}")
    keys = directory / "keys"
    identity, sealing = _make_keys(keys)
    member = member_json(Member(name, role, identity.public_key, sealing.public_key, address))
    tls_files = None
    if tls:
        member["tls_request"] = request(name, keys / "tls.key").decode("ascii")
        tls_files = TlsFiles(directory / "ca.pem", keys / "tls.pem", keys / "tls.key")
    config = _node_config(directory, name, directory / GENESIS_FILE, Address(_listen_host(address.host), address.port),
                          institution=role == "institution", tls=tls_files)
    _write_toml(config.path, config.to_toml_dict(),
                f"# ehrnode node configuration for {name}. Before the first start, put beside this file the\n"
                "# consortium's genesis.toml" + (", its CA (ca.pem) and this member's certificate as "
                                                  "keys/tls.pem" if tls else "") + ".\n")
    (directory / MEMBER_FILE).write_text(json.dumps(member, indent=2) + "\n", encoding="utf-8")
    return config, member


def _listen_host(host: str) -> str:
    """Where to listen for peers reached at ``host``: that address if it is one, else every interface."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return "0.0.0.0"
    return host


def found_consortium(directory: Path, member_files: Sequence[Path], *, tls: bool = True) -> Genesis:
    """The founding genesis from the members' public halves (``member.json`` of ``keys init``).

    Writes ``directory/genesis.toml`` and, with ``tls``, the consortium CA (``ca/``) and each
    member's certificate (``certs/<name>.pem``) from its request. Generates the consortium's
    EMPI pseudonym key and writes it nowhere: it travels in the genesis, sealed to each
    institution. Refuses to overwrite anything.
    """
    directory = Path(directory)
    # Every member's public half and certificate request is checked before anything is written.
    members: list[Member] = []
    tls_keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for path in member_files:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--members: cannot read {path}: {exc}") from exc
        where = f"--members {path}"
        member = parse_member(doc, where)
        if tls:
            if not isinstance(doc.get("tls_request"), str):
                raise ConfigError(f"{where}: no TLS certificate request (made with `keys init --no-tls`?); "
                                  "found with --no-tls, or make the member's keys again")
            tls_keys[member.name] = check_request(member.name, doc["tls_request"])
        members.append(member)
    if not any(m.role == "institution" for m in members):
        raise ConfigError("a consortium needs at least one institution")
    check_distinct(members, "--members")
    existing = [p for p in (directory / GENESIS_FILE, directory / "ca", directory / CERTS_DIR) if p.exists()]
    if existing:
        raise ConfigError(f"refusing to overwrite existing {existing[0]}")
    directory.mkdir(parents=True, exist_ok=True)
    chain_id = f"ehrnode-{secrets.token_hex(8)}"
    if tls:
        ca_cert, ca_key = create_ca(directory / "ca", chain_id)
        (directory / CERTS_DIR).mkdir()
        for name, public in tls_keys.items():
            (directory / CERTS_DIR / f"{name}.pem").write_bytes(certificate(ca_cert, ca_key, name, public))
    secret = os.urandom(32)
    sealed = {m.name: crypto.seal_to(m.sealing_key, secret, CONSORTIUM_KEY_CONTEXT + chain_id.encode())
              for m in members if m.role == "institution"}
    genesis = Genesis(chain_id, tuple(members), EpochGrant.create(chain_id, 0, {m.name: m.sealing_key
                                                                                 for m in members}), sealed,
                      rules=LEDGER_RULES)
    _write_toml(directory / GENESIS_FILE, genesis.to_toml_dict(),
                "# Consortium genesis: public keys, addresses, and the first epoch key and the EMPI key sealed to\n"
                "# each member. Identical at every member.\n")
    return genesis


def install_consortium_key(config: NodeConfig, genesis: Genesis, sealing: crypto.SealingKey) -> bool:
    """Open this institution's sealed copy of the consortium's EMPI key from genesis into its
    ``consortium.key`` (0600), if it has none yet; True if it wrote one."""
    path = config.consortium_key_path
    if path is None or path.exists() or config.name not in genesis.consortium_key:
        return False
    secret = sealing.open(genesis.consortium_key[config.name], CONSORTIUM_KEY_CONTEXT + genesis.chain_id.encode())
    crypto.write_secret_file(path, secret)
    return True


def _member_files(directory: Path, name: str, genesis_path: Path, peer: Address, consortium_secret: bytes | None,
                  ca: tuple[Path, Path] | None) -> tuple[NodeConfig, crypto.Identity, crypto.SealingKey]:
    """One member's keys directory (0700: signing and sealing keys, its records secret, for an
    institution the consortium's EMPI pseudonym key, with ``ca`` a TLS certificate) and its node
    configuration (returned, not written)."""
    keys = directory / name / "keys"
    identity, sealing = _make_keys(keys)
    if consortium_secret is not None:
        crypto.write_secret_file(keys / "consortium.key", consortium_secret)
    tls_files = None
    if ca is not None:
        issue(*ca, name, keys / "tls.pem", keys / "tls.key")
        tls_files = TlsFiles(ca[0], keys / "tls.pem", keys / "tls.key")
    config = _node_config(directory / name, name, genesis_path, peer, institution=consortium_secret is not None,
                          tls=tls_files)
    return config, identity, sealing


def _make_keys(keys: Path) -> tuple[crypto.Identity, crypto.SealingKey]:
    """A member's keys directory (0700): a new signing key, sealing key and records secret (0600)."""
    keys.mkdir(parents=True, mode=0o700)
    os.chmod(keys, 0o700)
    identity, sealing = crypto.Identity.generate(), crypto.SealingKey.generate()
    identity.save(keys / "signing.pem")
    sealing.save(keys / "sealing.pem")
    create_secret(keys / "master.key")
    return identity, sealing


def _node_config(home: Path, name: str, genesis_path: Path, peer_listen: Address, *, institution: bool,
                 tls: TlsFiles | None) -> NodeConfig:
    """The node configuration of a member living in ``home`` (keys in ``home/keys``): its API and
    metrics on loopback, at fixed offsets from its peer port."""
    keys = home / "keys"
    return NodeConfig(
        path=home / NODE_FILE, name=name, genesis_path=genesis_path, data_dir=home / "data",
        signing_key_path=keys / "signing.pem", sealing_key_path=keys / "sealing.pem", peer_listen=peer_listen,
        api_listen=Address("127.0.0.1", peer_listen.port + API_PORT_OFFSET),
        log_level="info", metrics_listen=Address("127.0.0.1", peer_listen.port + METRICS_PORT_OFFSET),
        fhir_listen=Address("127.0.0.1", peer_listen.port + FHIR_PORT_OFFSET),
        master_key_path=keys / "master.key",
        consortium_key_path=keys / "consortium.key" if institution else None, tls=tls,
    )


def member_json(member: Member) -> dict[str, str]:
    return {"name": member.name, "role": member.role, "signing_key": member.signing_key.hex(),
            "sealing_key": member.sealing_key.hex(), "address": str(member.address)}


def _write_toml(path: Path, doc: dict, header: str) -> None:
    path.write_text(header + tomli_w.dumps(doc), encoding="utf-8")
