"""Encrypted backups of a node, taken while it runs, and restoring one.

Theory of operation
-------------------
``ehrnode backup`` copies the node's three SQLite stores with SQLite's online
backup API (each copy is one consistent snapshot, taken while the node keeps
writing), in the order blocks, ledger state, vault: the vault copy is the
newest, so it holds every entry the copied ledger has anchors for. It adds the
node's key files and API token and a manifest (node, chain, genesis hash,
heights, time, SHA-256 of every file). Everything goes into one tar stream,
encrypted as it is written: scrypt turns the passphrase into a key, and the
stream is cut into 1 MiB chunks, each sealed with AES-256-GCM under a counter
nonce, with the header, the chunk's index and a last-chunk flag as associated
data, so a chunk changed, dropped, reordered or cut off at the end is refused.
No plaintext copy of a key or a store is ever written outside the archive:
store snapshots are taken in a private temporary directory beside the output
and deleted.

The safety data (what this validator last signed) is deliberately *not*
restored: an old copy would let the node sign a second, different vote in a
round it already voted in. ``ehrnode restore`` writes fresh safety data marked
*restored* instead; the node then signs nothing until 2f+1 other validators
have reported their highest certificates (:mod:`ehrnode.consensus.survey`),
and votes again only above every round it can have voted in. Blocks committed after
the backup come back from the peers by sync. Records written after the backup
exist nowhere else and are lost: the node refuses to record while its vault is
behind the chain's anchors, and says so.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import struct
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .config import NodeConfig, load_genesis
from .consensus.safety import SafetyData
from .errors import ConfigError, EhrnodeError
from .ledger.safety_store import FileSafetyStore

MAGIC = b"EHRNODE-BACKUP-1\n"
CHUNK = 1024 * 1024
#: scrypt cost (log2 N, r, p), written in the header (and bound into every chunk).
SCRYPT = (17, 8, 1)
MAX_SCRYPT_LOG_N = 20
MIN_PASSPHRASE = 12
STORES = ("blocks.sqlite3", "state.sqlite3", "vault.sqlite3", "users.db")
#: Secrets kept in the data directory: the admin credential and the key behind user pseudonyms.
DATA_SECRETS = ("api.token", "users.key")


class BackupError(EhrnodeError):
    reason = "backup"


HEADER = len(MAGIC) + 16 + 3


def _key(passphrase: str, salt: bytes, cost: tuple[int, int, int]) -> bytes:
    if len(passphrase) < MIN_PASSPHRASE:
        raise BackupError(f"the backup passphrase must be at least {MIN_PASSPHRASE} characters",
                          reason="weak_passphrase")
    log_n, r, p = cost
    return Scrypt(salt=salt, length=32, n=2 ** log_n, r=r, p=p).derive(passphrase.encode("utf-8"))


class _SealingWriter(io.RawIOBase):
    """A write-only stream that seals what it is given, chunk by chunk, into ``out``."""

    def __init__(self, out: BinaryIO, passphrase: str) -> None:
        salt = os.urandom(16)
        self._header = MAGIC + salt + bytes(SCRYPT)
        self._aead = AESGCM(_key(passphrase, salt, SCRYPT))
        self._out = out
        self._buffer = bytearray()
        self._index = 0
        out.write(self._header)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._buffer += data
        while len(self._buffer) > CHUNK:
            self._seal(bytes(self._buffer[:CHUNK]), last=False)
            del self._buffer[:CHUNK]
        return len(data)

    def _seal(self, chunk: bytes, *, last: bool) -> None:
        nonce = struct.pack(">4xQ", self._index)
        sealed = self._aead.encrypt(nonce, chunk, self._header + struct.pack(">Q?", self._index, last))
        self._out.write(struct.pack(">I", len(sealed)) + sealed)
        self._index += 1

    def finish(self) -> None:
        self._seal(bytes(self._buffer), last=True)
        self._buffer.clear()


def _open_chunks(source: BinaryIO, passphrase: str) -> Any:
    header = source.read(HEADER)
    if len(header) < HEADER or not header.startswith(MAGIC):
        raise BackupError("not an ehrnode backup (wrong header)", reason="not_a_backup")
    cost = tuple(header[-3:])
    if not (10 <= cost[0] <= MAX_SCRYPT_LOG_N and 1 <= cost[1] <= 32 and 1 <= cost[2] <= 16):
        raise BackupError("the backup's header is corrupt (key derivation settings)", reason="corrupt")
    aead = AESGCM(_key(passphrase, header[len(MAGIC):len(MAGIC) + 16], cost))  # type: ignore[arg-type]
    index = 0
    while True:
        size_bytes = source.read(4)
        if len(size_bytes) < 4:
            raise BackupError("the backup is truncated (no final chunk)", reason="truncated")
        (size,) = struct.unpack(">I", size_bytes)
        if size > CHUNK + 16:
            raise BackupError("the backup is corrupt (chunk too large)", reason="corrupt")
        sealed = source.read(size)
        nonce = struct.pack(">4xQ", index)
        for last in (False, True):
            try:
                chunk = aead.decrypt(nonce, sealed, header + struct.pack(">Q?", index, last))
                break
            except InvalidTag:
                continue
        else:
            raise BackupError("the backup does not decrypt: wrong passphrase, or the file was changed",
                              reason="bad_passphrase_or_corrupt")
        yield chunk
        if last:
            if source.read(1):
                raise BackupError("the backup has data after its final chunk", reason="corrupt")
            return
        index += 1


class _OpeningReader(io.RawIOBase):
    def __init__(self, source: BinaryIO, passphrase: str) -> None:
        self._chunks = _open_chunks(source, passphrase)
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def _key_files(config: NodeConfig) -> dict[str, Path]:
    files = {"keys/signing.pem": config.signing_key_path, "keys/sealing.pem": config.sealing_key_path}
    if config.master_key_path:
        files["keys/master.key"] = config.master_key_path
    if config.consortium_key_path:
        files["keys/consortium.key"] = config.consortium_key_path
    if config.tls is not None:
        # The member's TLS key and certificate: without them a restored node cannot reach its
        # peers (the CA's certificate is public, and the same at every member).
        files["keys/tls.key"] = config.tls.key
        files["keys/tls.pem"] = config.tls.cert
    return files


def _snapshot(source: Path, target: Path) -> None:
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise BackupError(f"cannot snapshot {source}: {exc}", reason="snapshot") from exc


def create_backup(config: NodeConfig, out: Path, passphrase: str) -> dict[str, Any]:
    """Write an encrypted backup of the node of ``config`` to ``out`` (new file, mode 0600)."""
    genesis = load_genesis(config.genesis_path)
    out = Path(out)
    if out.exists():
        raise BackupError(f"{out} exists: refusing to overwrite", reason="exists")
    missing = [name for name in STORES[:2] if not (config.data_dir / name).exists()]
    if missing:
        raise BackupError(f"{config.data_dir} has no {', '.join(missing)}: nothing to back up", reason="no_data")
    manifest: dict[str, Any] = {"node": config.name, "chain": genesis.chain_id, "genesis": genesis.hash.hex(),
                                "created": int(time.time() * 1000), "files": {}}
    with tempfile.TemporaryDirectory(prefix=".ehrnode-backup-", dir=out.parent) as tmp:
        os.chmod(tmp, 0o700)
        members: dict[str, Path] = {}
        for name in STORES:
            if (config.data_dir / name).exists():
                _snapshot(config.data_dir / name, Path(tmp) / name)
                members[f"data/{name}"] = Path(tmp) / name
        for name in DATA_SECRETS:
            if (config.data_dir / name).exists():
                members[f"data/{name}"] = config.data_dir / name
        members.update(_key_files(config))
        for arc, path in members.items():
            manifest["files"][arc] = _file_digest(path)
        manifest["heights"] = _heights(Path(tmp))
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as raw:
                writer = _SealingWriter(raw, passphrase)
                with tarfile.open(fileobj=writer, mode="w|", dereference=True) as tar:
                    body = json.dumps(manifest, indent=2).encode()
                    info = tarfile.TarInfo("manifest.json")
                    info.size = len(body)
                    tar.addfile(info, io.BytesIO(body))
                    for arc, path in members.items():
                        tar.add(path, arcname=arc, recursive=False)
                writer.finish()
                raw.flush()
                os.fsync(raw.fileno())
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    manifest["bytes"] = out.stat().st_size
    return manifest


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _heights(snapshots: Path) -> dict[str, int]:
    heights = {}
    for name, sql in (("blocks.sqlite3", "SELECT MAX(height) FROM committed"),
                      ("state.sqlite3", "SELECT height FROM applied"),
                      ("vault.sqlite3", "SELECT MAX(position) FROM entries")):
        path = snapshots / name
        if not path.exists():
            continue
        db = sqlite3.connect(path)
        try:
            row = db.execute(sql).fetchone()
            heights[name.split(".")[0]] = (row[0] or 0) if row else 0
        except sqlite3.Error:
            heights[name.split(".")[0]] = -1
        finally:
            db.close()
    return heights


def restore_backup(config: NodeConfig, source: Path, passphrase: str) -> dict[str, Any]:
    """Bring the node of ``config`` back from ``source``; its data directory must hold no stores."""
    genesis = load_genesis(config.genesis_path)
    data_dir = config.data_dir
    leftovers = sorted(p.name for p in data_dir.glob("*") if p.name.startswith(("blocks.", "state.", "vault.",
                                                                                  "safety.", "users.")))
    if leftovers:
        raise BackupError(f"{data_dir} still holds {', '.join(leftovers)}: move the data directory away "
                          "before restoring into it", reason="not_empty")
    targets = {f"data/{name}": data_dir / name for name in (*STORES, *DATA_SECRETS)}
    targets.update(_key_files(config))
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # First of all, the safety data marked restored: if anything below fails, the node can
    # still never start signing with a blank history.
    safety = data_dir / "safety.cbor"
    FileSafetyStore(safety).save(SafetyData(epoch=genesis.validators.epoch, restored=True))
    staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=data_dir))
    placed = False
    try:
        manifest, digests = _unpack(source, passphrase, staging, set(targets))
        if manifest["node"] != config.name or manifest["genesis"] != genesis.hash.hex():
            raise ConfigError(f"the backup is of {manifest['node']} on chain {manifest['chain']}, not of "
                              f"{config.name} on {genesis.chain_id}")
        for arc, digest in manifest["files"].items():
            if arc not in targets:
                raise ConfigError(f"the backup holds {arc}, which {config.path} names no place for "
                                  "(add it under [keys])")
            if digests.get(arc) != digest:
                raise BackupError(f"{arc} does not match the backup's manifest", reason="corrupt")
        for arc in digests:
            path = targets[arc]
            if arc.startswith("keys/") and path.exists() and path.read_bytes() != (staging / arc).read_bytes():
                raise BackupError(f"{path} exists and differs from the key in the backup", reason="key_mismatch")
        placed = True
        for arc in digests:
            path = targets[arc]
            if path.exists():
                continue  # a key file that is already the same key
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.replace(staging / arc, path)
        _fsync_dir(data_dir)
    except BaseException:
        if not placed:
            safety.unlink(missing_ok=True)  # nothing was restored: leave the directory as it was
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _unpack(source: Path, passphrase: str, staging: Path, allowed: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Decrypt and unpack into ``staging`` (streamed: a large vault never sits in memory)."""
    manifest: dict[str, Any] | None = None
    digests: dict[str, str] = {}
    try:
        with open(source, "rb") as raw:
            reader = _OpeningReader(raw, passphrase)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    if not member.isfile() or (member.name != "manifest.json" and member.name not in allowed):
                        raise BackupError(f"unexpected entry {member.name!r} in the backup", reason="corrupt")
                    handle = tar.extractfile(member)
                    assert handle is not None
                    if member.name == "manifest.json":
                        manifest = json.loads(handle.read(1 << 20))
                        continue
                    target = staging / member.name
                    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                    digest = hashlib.sha256()
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        while block := handle.read(CHUNK):
                            digest.update(block)
                            out.write(block)
                        out.flush()
                        os.fsync(out.fileno())
                    digests[member.name] = digest.hexdigest()
            # Read to the end, so a missing final chunk or anything after it is found.
            while reader.read(CHUNK):
                pass
    except OSError as exc:
        raise BackupError(f"cannot read {source}: {exc}", reason="unreadable") from exc
    except (tarfile.TarError, ValueError) as exc:
        raise BackupError(f"the backup's archive is damaged: {exc}", reason="corrupt") from exc
    if manifest is None:
        raise BackupError("the backup has no manifest", reason="corrupt")
    return manifest, digests


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
