"""The consortium's genesis file and each node's own configuration.

``genesis.toml`` is public and the same at every member: the chain id, the
members (name, role, Ed25519 signing key, X25519 sealing key, peer address),
and the key of epoch 0 sealed to each member (:mod:`ehrnode.epochs`).
Its hash binds peers to one consortium. ``node.toml`` is one member's: where
its keys, data and genesis are (paths relative to the file itself), which
addresses it listens on, and its log level.

Loading either checks every field and raises :class:`~ehrnode.errors.ConfigError`
with one line naming the file and the field, so ``ehrnode run`` can refuse a
bad configuration before it opens anything.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from . import codec, crypto
from .consensus.types import ValidatorSet
from .epochs import EpochGrant
from .errors import ConfigError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}\Z")
ROLES = ("institution", "regulator")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: OPRF evaluations a member answers per requesting member and day: a few thousand enrolments
#: and lookups an hour with room to spare; a bulk load spread over days, or the quota raised for it.
DEFAULT_OPRF_DAILY = 500_000
DEFAULT_ROTATE_DAYS = 30.0
#: Without ``[fhir] listen``, the FHIR REST interface listens this many ports above the API.
FHIR_FROM_API = 200


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: Any, where: str) -> Address:
        if not isinstance(text, str) or ":" not in text:
            raise ConfigError(f"{where}: expected HOST:PORT, got {text!r}")
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{where}: expected HOST:PORT with a port in 1..65535, got {text!r}")
        return cls(host.strip("[]"), int(port))


@dataclass(frozen=True)
class Member:
    name: str
    role: str
    signing_key: bytes
    sealing_key: bytes
    address: Address


#: The newest ledger rules this release applies. A consortium's genesis names the rules its chain
#: follows from its first block (``rules``; 1 when absent: consortia founded before anchors and
#: access decisions were batched). Version 2 adds ``record.anchors`` and ``access.logs``, and
#: integrity alerts naming an access by its request; on a chain of rules 1 they stay what they were
#: to the nodes that applied its first blocks (unknown kinds, unknown accesses), so every node
#: applies every block of a chain by the same rules, whenever it applies it.
LEDGER_RULES = 2


@dataclass(frozen=True)
class Genesis:
    chain_id: str
    members: tuple[Member, ...]
    #: The key of epoch 0, sealed to every member.
    epoch_key: EpochGrant | None = None
    #: The consortium's EMPI pseudonym key sealed to each institution, when the consortium was
    #: founded from its members' public halves (``consortium init --members``); empty when
    #: every member's files were made in one place.
    consortium_key: Mapping[str, bytes] = field(default_factory=dict)
    #: The ledger rules of the chain (see ``LEDGER_RULES``).
    rules: int = 1

    def to_toml_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "chain_id": self.chain_id,
            "members": [
                {"name": m.name, "role": m.role, "signing_key": m.signing_key.hex(),
                 "sealing_key": m.sealing_key.hex(), "address": str(m.address)}
                for m in self.members
            ],
        }
        if self.epoch_key is not None:
            doc["epoch_key"] = {"check": self.epoch_key.check.hex(),
                                "sealed": {name: copy.hex() for name, copy in self.epoch_key.sealed.items()}}
        if self.consortium_key:
            doc["consortium_key"] = {"sealed": {name: copy.hex() for name, copy in self.consortium_key.items()}}
        if self.rules != 1:  # a genesis from before rules were named keeps its hash
            doc["rules"] = self.rules
        return doc

    @cached_property
    def hash(self) -> bytes:
        """SHA-256 of the canonical encoding: equal for every member holding the same genesis."""
        return crypto.sha256(codec.encode(self.to_toml_dict()))

    @cached_property
    def validators(self) -> ValidatorSet:
        return ValidatorSet(self.chain_id, tuple(m.signing_key for m in self.members))

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise ConfigError(f"{name!r} is not a member of consortium {self.chain_id}")

    def index(self, name: str) -> int:
        return self.members.index(self.member(name))


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    api: bool = True


@dataclass(frozen=True)
class NodeConfig:
    path: Path
    name: str
    genesis_path: Path
    data_dir: Path
    signing_key_path: Path
    sealing_key_path: Path
    peer_listen: Address
    api_listen: Address
    log_level: str
    #: Prometheus endpoint; None turns it off.
    metrics_listen: Address | None = None
    #: The FHIR R4 REST interface ([fhir] listen; on by default at ``FHIR_FROM_API`` ports above the
    #: API's, on the API's host); None turns it off ([fhir] enabled = false).
    fhir_listen: Address | None = None
    #: The FHIR base URL clients use ([fhir] base_url), when it is not ``http[s]://listen/fhir``
    #: (a listener on 0.0.0.0, a host name the certificate or a proxy answers to).
    fhir_base_url: str | None = None
    #: The institution's own secret behind the vault and de-identification (records off without it).
    master_key_path: Path | None = None
    #: The consortium-wide EMPI pseudonym key (institutions only).
    consortium_key_path: Path | None = None
    #: A de-identification profile replacing the packaged default.
    deid_profile_path: Path | str | None = None
    #: Processes that validate and de-identify large inputs (0 or 1: none, in the node itself;
    #: None: one per core, at most 8).
    record_workers: int | None = None
    #: Start those processes with the node (``[records] prestart``), so the first large input after
    #: a start does not wait for them; False: on the first large input.
    record_prestart: bool = True
    #: The access policy for pulls of this institution's records, replacing the packaged default.
    access_policy_path: Path | None = None
    #: The roles of the local API's users, replacing the packaged default.
    roles_path: Path | None = None
    #: TLS with the consortium's CA ([tls]): the CA certificate, this member's certificate and key;
    #: None: no TLS. ``tls_api``: the local API uses it too.
    tls: TlsFiles | None = None
    #: Days an epoch key is used before this member rotates it, when it is this member's turn
    #: ([keys] rotate_days; see :mod:`ehrnode.epochs`).
    rotate_days: float = DEFAULT_ROTATE_DAYS
    #: OPRF evaluations this member answers per requesting member and UTC day ([empi] oprf_daily;
    #: see :mod:`ehrnode.ledger.oprf_usage`).
    oprf_daily: int = DEFAULT_OPRF_DAILY

    @property
    def next_key_paths(self) -> tuple[Path, Path]:
        """Where `consortium new-keys` puts the member's replacement keys, beside its keys."""
        return (self.signing_key_path.with_name("signing.next.pem"),
                self.sealing_key_path.with_name("sealing.next.pem"))

    def to_toml_dict(self) -> dict[str, Any]:
        def rel(p: Path) -> str:
            return os.path.relpath(p, self.path.parent)

        records = {
            **({"profile": self.deid_profile_path if isinstance(self.deid_profile_path, str)
                else rel(self.deid_profile_path)} if self.deid_profile_path else {}),
            **({"workers": self.record_workers} if self.record_workers is not None else {}),
            **({"prestart": False} if not self.record_prestart else {}),
        }
        return {
            "name": self.name,
            "genesis": rel(self.genesis_path),
            "data_dir": rel(self.data_dir),
            "log_level": self.log_level,
            "keys": {
                "signing": rel(self.signing_key_path), "sealing": rel(self.sealing_key_path),
                **({"master": rel(self.master_key_path)} if self.master_key_path else {}),
                **({"consortium": rel(self.consortium_key_path)} if self.consortium_key_path else {}),
                **({"rotate_days": self.rotate_days} if self.rotate_days != DEFAULT_ROTATE_DAYS else {}),
            },
            "peer": {"listen": str(self.peer_listen)},
            "api": {"listen": str(self.api_listen)},
            **({"metrics": {"listen": str(self.metrics_listen)}} if self.metrics_listen else {}),
            "fhir": ({"listen": str(self.fhir_listen),
                      **({"base_url": self.fhir_base_url} if self.fhir_base_url else {})}
                     if self.fhir_listen else {"enabled": False}),
            **({"records": records} if records else {}),
            **({"sharing": {"policy": rel(self.access_policy_path)}} if self.access_policy_path else {}),
            **({"users": {"roles": rel(self.roles_path)}} if self.roles_path else {}),
            **({"tls": {"ca": rel(self.tls.ca), "cert": rel(self.tls.cert), "key": rel(self.tls.key),
                        "api": self.tls.api}} if self.tls else {}),
            **({"empi": {"oprf_daily": self.oprf_daily}} if self.oprf_daily != DEFAULT_OPRF_DAILY else {}),
        }


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from exc


def load_settings(path: Path | None, package: str, default: str, what: str) -> tuple[dict[str, Any], str]:
    """A settings file an institution may replace: ``path``'s TOML, or the packaged ``default`` of
    ``package`` when None; with the name its errors are reported under. Raises ConfigError."""
    if path is None:
        source = f"default {what}"
        text = (importlib.resources.files(package) / default).read_text(encoding="utf-8")
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read the {what}: {exc}") from exc
    try:
        return tomllib.loads(text), source
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc


def _field(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{where}: missing field {key!r}")
    value = table[key]
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: field {key!r} must be a {kind.__name__}")
    return value


def _hex_key(text: str, where: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: not hexadecimal") from exc
    if len(raw) != 32:
        raise ConfigError(f"{where}: expected a 32-byte key, got {len(raw)} bytes")
    return raw


def check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError(f"{where}: member name {name!r} must be 1-32 letters, digits, '-' or '_'")
    return name


def parse_member(m: Any, at: str) -> Member:
    """One member's public half (a genesis table, or a ``member.json``); ConfigError naming ``at``."""
    if not isinstance(m, dict):
        raise ConfigError(f"{at}: expected a table")
    role = _field(m, "role", str, at)
    if role not in ROLES:
        raise ConfigError(f"{at}: role must be one of {', '.join(ROLES)}, got {role!r}")
    return Member(
        name=check_name(_field(m, "name", str, at), at),
        role=role,
        signing_key=_hex_key(_field(m, "signing_key", str, at), f"{at} signing_key"),
        sealing_key=_hex_key(_field(m, "sealing_key", str, at), f"{at} sealing_key"),
        address=Address.parse(_field(m, "address", str, at), f"{at} address"),
    )


def check_distinct(members: Sequence[Member], where: str) -> None:
    """No two members with one name or one key."""
    for attr in ("name", "signing_key", "sealing_key"):
        values = [getattr(m, attr) for m in members]
        if len(set(values)) != len(values):
            raise ConfigError(f"{where}: two members share a {attr.replace('_', ' ')}")


def parse_genesis(doc: dict[str, Any], where: str) -> Genesis:
    chain_id = _field(doc, "chain_id", str, where)
    if not 1 <= len(chain_id) <= 64:
        raise ConfigError(f"{where}: chain_id must be 1-64 characters")
    raw_members = _field(doc, "members", list, where)
    if not raw_members:
        raise ConfigError(f"{where}: no members")
    members = [parse_member(m, f"{where} members[{i}]") for i, m in enumerate(raw_members)]
    check_distinct(members, where)
    rules = doc.get("rules", 1)
    if not isinstance(rules, int) or isinstance(rules, bool) or rules < 1:
        raise ConfigError(f"{where}: rules must be a positive whole number")
    if rules > LEDGER_RULES:
        raise ConfigError(f"{where}: the chain follows ledger rules {rules}; this release of ehrnode applies rules "
                          f"up to {LEDGER_RULES}: upgrade it")
    return Genesis(chain_id, tuple(members), _epoch_key(doc, where, [m.name for m in members]),
                   _consortium_key(doc, where, [m.name for m in members if m.role == "institution"]), rules)


def _consortium_key(doc: dict[str, Any], where: str, institutions: list[str]) -> dict[str, bytes]:
    if "consortium_key" not in doc:
        return {}
    at = f"{where} [consortium_key]"
    sealed = _table(_table(doc, "consortium_key", where), "sealed", at)
    if sorted(sealed) != sorted(institutions):
        raise ConfigError(f"{at}.sealed: one sealed key per institution expected, for {', '.join(institutions)}")
    try:
        return {name: bytes.fromhex(_field(sealed, name, str, f"{at}.sealed")) for name in institutions}
    except ValueError as exc:
        raise ConfigError(f"{at}: not hex: {exc}") from exc


def _epoch_key(doc: dict[str, Any], where: str, names: list[str]) -> EpochGrant:
    at = f"{where} [epoch_key]"
    if "epoch_key" not in doc:
        raise ConfigError(f"{at}: missing; this genesis predates encrypted payloads: set the consortium up again "
                          "with 'ehrnode consortium init'")
    table = _table(doc, "epoch_key", where)
    check = _field(table, "check", str, at)
    sealed = _table(table, "sealed", at)
    if sorted(sealed) != sorted(names):
        raise ConfigError(f"{at}.sealed: one sealed key per member expected, for {', '.join(names)}")
    try:
        grant = EpochGrant(0, bytes.fromhex(check), {name: bytes.fromhex(_field(sealed, name, str, f"{at}.sealed"))
                                                     for name in names})
    except ValueError as exc:
        raise ConfigError(f"{at}: not hex: {exc}") from exc
    if len(grant.check) != 32:
        raise ConfigError(f"{at}.check: 32 bytes of hex expected")
    return grant


def load_genesis(path: Path) -> Genesis:
    path = Path(path)
    return parse_genesis(_read_toml(path, "genesis file"), str(path))


def load_node_config(path: Path) -> NodeConfig:
    path = Path(path)
    doc = _read_toml(path, "node config")
    where = str(path)
    base = path.parent

    def resolve(value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else (base / p)

    keys = _field(doc, "keys", dict, where)
    peer = _field(doc, "peer", dict, where)
    api = _field(doc, "api", dict, where)
    records = _records(doc, where)
    level = doc.get("log_level", "info")
    if level not in LOG_LEVELS:
        raise ConfigError(f"{where}: log_level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return NodeConfig(
        path=path,
        name=check_name(_field(doc, "name", str, where), where),
        genesis_path=resolve(_field(doc, "genesis", str, where)),
        data_dir=resolve(_field(doc, "data_dir", str, where)),
        signing_key_path=resolve(_field(keys, "signing", str, f"{where} [keys]")),
        sealing_key_path=resolve(_field(keys, "sealing", str, f"{where} [keys]")),
        peer_listen=Address.parse(_field(peer, "listen", str, f"{where} [peer]"), f"{where} [peer] listen"),
        api_listen=Address.parse(_field(api, "listen", str, f"{where} [api]"), f"{where} [api] listen"),
        log_level=level,
        metrics_listen=_metrics_address(doc, where),
        fhir_listen=_fhir_address(doc, api, where),
        fhir_base_url=_fhir_base_url(doc, where),
        master_key_path=_optional_path(keys, "master", f"{where} [keys]", resolve),
        consortium_key_path=_optional_path(keys, "consortium", f"{where} [keys]", resolve),
        deid_profile_path=_profile(records, f"{where} [records]", resolve),
        **_record_workers(records, f"{where} [records]"),
        access_policy_path=_optional_path(_table(doc, "sharing", where), "policy", f"{where} [sharing]", resolve),
        roles_path=_optional_path(_table(doc, "users", where), "roles", f"{where} [users]", resolve),
        tls=_tls(_table(doc, "tls", where), f"{where} [tls]", resolve) if "tls" in doc else None,
        rotate_days=_rotate_days(keys, f"{where} [keys]"),
        oprf_daily=_oprf_daily(_table(doc, "empi", where), f"{where} [empi]"),
    )


def _oprf_daily(table: dict[str, Any], where: str) -> int:
    unknown = set(table) - {"oprf_daily"}
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    value = table.get("oprf_daily", DEFAULT_OPRF_DAILY)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 10**9:
        raise ConfigError(f"{where}: oprf_daily must be a number of evaluations from 0 to 1000000000")
    return value


def _rotate_days(keys: dict[str, Any], where: str) -> float:
    value = keys.get("rotate_days", DEFAULT_ROTATE_DAYS)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3650:
        raise ConfigError(f"{where}: rotate_days must be a number of days, more than 0 and at most 3650")
    return float(value)


def _tls(table: dict[str, Any], where: str, resolve: Any) -> TlsFiles:
    unknown = set(table) - {"ca", "cert", "key", "api"}
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    api = table.get("api", True)
    if not isinstance(api, bool):
        raise ConfigError(f"{where}: api must be true or false")
    return TlsFiles(resolve(_field(table, "ca", str, where)), resolve(_field(table, "cert", str, where)),
                    resolve(_field(table, "key", str, where)), api)


def _records(doc: dict[str, Any], where: str) -> dict[str, Any]:
    table = _table(doc, "records", where)
    unknown = set(table) - {"profile", "workers", "prestart"}
    if unknown:
        raise ConfigError(f"{where} [records]: unknown setting(s) {', '.join(sorted(unknown))}")
    return table


def _record_workers(table: dict[str, Any], where: str) -> dict[str, Any]:
    """``[records] workers`` and ``prestart``, as NodeConfig fields (those given)."""
    found: dict[str, Any] = {}
    if "workers" in table:
        value = table["workers"]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 64:
            raise ConfigError(f"{where}: workers must be an integer from 0 to 64")
        found["record_workers"] = value
    if "prestart" in table:
        if not isinstance(table["prestart"], bool):
            raise ConfigError(f"{where}: prestart must be true or false")
        found["record_prestart"] = table["prestart"]
    return found


def _table(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{key}] must be a table")
    return value


def _profile(table: dict[str, Any], where: str, resolve: Any) -> Path | str | None:
    """``[records] profile``: a bare name picks a packaged profile (``default``, ``notes``), a
    path (with a / or ending in .toml) a file."""
    if "profile" not in table:
        return None
    value = _field(table, "profile", str, where)
    if "/" in value or "\\" in value or value.endswith(".toml"):
        return resolve(value)
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,31}", value):
        raise ConfigError(f"{where}: profile {value!r} is neither a packaged profile's name nor a .toml path")
    return value


def _optional_path(table: dict[str, Any], key: str, where: str, resolve: Any) -> Path | None:
    return resolve(_field(table, key, str, where)) if key in table else None


def _fhir_address(doc: dict[str, Any], api: dict[str, Any], where: str) -> Address | None:
    """Where the FHIR REST interface listens: ``[fhir] listen``; without it, on the API's host,
    ``FHIR_FROM_API`` ports above the API's; nowhere with ``enabled = false``."""
    table = _table(doc, "fhir", where)
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}: [fhir] enabled must be true or false")
    unknown = set(table) - {"listen", "enabled", "base_url"}
    if unknown:
        raise ConfigError(f"{where}: [fhir] has no setting {', '.join(sorted(unknown))} (listen, base_url, enabled)")
    if not enabled:
        return None
    if "listen" in table:
        return Address.parse(_field(table, "listen", str, f"{where} [fhir]"), f"{where} [fhir] listen")
    api_address = Address.parse(api.get("listen"), f"{where} [api] listen")
    if api_address.port + FHIR_FROM_API > 65535:
        raise ConfigError(f"{where}: [fhir] listen is needed: the API's port {api_address.port} leaves no room for "
                          f"the default (the API's port + {FHIR_FROM_API})")
    return Address(api_address.host, api_address.port + FHIR_FROM_API)


def _fhir_base_url(doc: dict[str, Any], where: str) -> str | None:
    table = _table(doc, "fhir", where)
    if "base_url" not in table:
        return None
    url = _field(table, "base_url", str, f"{where} [fhir]")
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
        raise ConfigError(f"{where}: [fhir] base_url must be an http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


def _metrics_address(doc: dict[str, Any], where: str) -> Address | None:
    if "metrics" not in doc:
        return None
    metrics = doc["metrics"]
    if not isinstance(metrics, dict):
        raise ConfigError(f"{where}: [metrics] must be a table")
    return Address.parse(_field(metrics, "listen", str, f"{where} [metrics]"), f"{where} [metrics] listen")
