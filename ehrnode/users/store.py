"""The node's users: names, roles, pseudonyms and hashed credentials, in ``<data_dir>/users.db``.

Theory of operation
-------------------
A credential is a random 256-bit secret, shown once when a user is added or
rotated and stored only as its SHA-256: a secret of that strength cannot be
recovered from its hash, and the hash identifies the user at every
connection without a per-user salt. Brute force against the live API is
slowed and logged by :mod:`ehrnode.users.auth`.

A user's pseudonym is ``HMAC-SHA256(users.key, institution || name)`` cut to
15 bytes, written ``U`` and 24 base32 characters. It is what the chain
shows: the same user always appears under the same pseudonym, another
institution's user with the same name under a different one, and nobody
without this node's ``users.key`` can tell whose it is, or test a guess.
The institution resolves its own pseudonyms (``audit whois``).

Names are never reused: a revoked user keeps their row, so their pseudonym
still resolves for as long as the chain mentions them.

The user ``admin`` is the node's own: its credential is the one kept in
``api.token``, created at first start, so scripts that read ``api.token``
keep working as that admin. It can be rotated (the file is rewritten) but not
revoked.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..crypto import write_secret_file
from ..errors import CryptoError, EhrnodeError
from ..ledger.transactions import ACTOR_SIZE, EMPI_PATTERN, actor_text
from ..storage import open_db, transaction

USERS_DB = "users.db"
USERS_KEY = "users.key"
TOKEN_FILE = "api.token"
ADMIN_USER = "admin"
PSEUDONYM_SIZE = ACTOR_SIZE
PSEUDONYM_PATTERN = re.compile(r"^U[A-Z2-7]{24}\Z")
USER_NAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}\Z")
MIN_TOKEN_CHARS = 32
_PSEUDONYM_DOMAIN = b"ehrnode/user-pseudonym/v1\x00"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, empi TEXT, pseudonym BLOB NOT NULL UNIQUE,
    secret BLOB NOT NULL UNIQUE, created INTEGER NOT NULL, rotated INTEGER NOT NULL, revoked INTEGER NOT NULL,
    created_by TEXT NOT NULL);
"""


class UserError(EhrnodeError):
    reason = "users"


pseudonym_text = actor_text


def pseudonym_bytes(text: str) -> bytes:
    if not PSEUDONYM_PATTERN.match(text):
        raise UserError(f"{text!r} is not a user pseudonym (U and 24 base32 characters)", reason="bad_pseudonym")
    return base64.b32decode(text[1:])


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token() -> str:
    return "ehr_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class User:
    name: str
    role: str
    empi: str | None
    pseudonym: bytes
    secret: bytes  # SHA-256 of the credential
    created: int
    rotated: int
    revoked: int  # ms; 0 while active
    created_by: str

    @property
    def active(self) -> bool:
        return self.revoked == 0

    @property
    def alias(self) -> str:
        return pseudonym_text(self.pseudonym) or ""

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "empi": self.empi, "pseudonym": self.alias,
                "created": self.created, "rotated": self.rotated, "revoked": self.revoked or None,
                "created_by": self.created_by, "active": self.active}


_COLUMNS = ("name", "role", "empi", "pseudonym", "secret", "created", "rotated", "revoked", "created_by")


class UserStore:
    def __init__(self, data_dir: Path, institution: str) -> None:
        self.data_dir = Path(data_dir)
        self.institution = institution
        self._key = _load_key(self.data_dir / USERS_KEY, create=not (self.data_dir / USERS_DB).exists())
        self._db: sqlite3.Connection = open_db(self.data_dir / USERS_DB, _SCHEMA, "user store", durable=True)
        self._by_name: dict[str, User] = {}
        self._by_secret: dict[bytes, str] = {}
        for row in self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM users"):
            self._cache(User(*row))

    def close(self) -> None:
        self._db.close()

    def _cache(self, user: User) -> None:
        old = self._by_name.get(user.name)
        if old is not None:
            self._by_secret.pop(old.secret, None)
        self._by_name[user.name] = user
        self._by_secret[user.secret] = user.name

    # --- reading -------------------------------------------------------------------------

    def pseudonym_of(self, name: str) -> bytes:
        return hmac.new(self._key, _PSEUDONYM_DOMAIN + self.institution.encode() + b"\x00" + name.encode(),
                        hashlib.sha256).digest()[:PSEUDONYM_SIZE]

    def get(self, name: str) -> User | None:
        return self._by_name.get(name)

    def by_token(self, token: str) -> User | None:
        """The user whose credential ``token`` is, revoked or not (constant-time on the hash)."""
        digest = _digest(token)
        name = self._by_secret.get(digest)
        user = self._by_name.get(name) if name is not None else None
        if user is None or not hmac.compare_digest(user.secret, digest):
            return None
        return user

    def whois(self, pseudonym: bytes) -> User | None:
        for user in self._by_name.values():
            if hmac.compare_digest(user.pseudonym, pseudonym):
                return user
        return None

    def list(self) -> list[User]:
        return sorted(self._by_name.values(), key=lambda u: (u.created, u.name))

    # --- changing ------------------------------------------------------------------------

    def add(self, name: str, role: str, *, empi: str | None, by: str, patient_role: bool) -> tuple[User, str]:
        """Add a user; returns it and its credential (shown once, never stored)."""
        if not USER_NAME.match(name):
            raise UserError(f"{name!r}: a user name is 1-64 of a-z 0-9 . _ @ - (lower case, starting with a "
                            "letter or digit)", reason="bad_name")
        if name in self._by_name:
            state = "exists" if self._by_name[name].active else "was revoked (names are never reused)"
            raise UserError(f"user {name} {state}", reason="exists")
        if patient_role != (empi is not None):
            raise UserError(f"role {role} {'needs' if patient_role else 'takes no'} --empi", reason="bad_empi")
        if empi is not None and not EMPI_PATTERN.match(empi):
            raise UserError(f"{empi!r} is not an EMPI", reason="bad_empi")
        token = new_token()
        now = _now()
        user = User(name, role, empi, self.pseudonym_of(name), _digest(token), now, now, 0, by)
        self._write(user, insert=True)
        return user, token

    def rotate(self, name: str) -> tuple[User, str]:
        """A new credential for an active user; the old one stops working at once."""
        user = self._active(name)
        token = new_token()
        if name == ADMIN_USER:
            _replace_token_file(self.data_dir / TOKEN_FILE, token)
        rotated = replace(user, secret=_digest(token), rotated=_now())
        self._write(rotated)
        return rotated, token

    def revoke(self, name: str) -> User:
        user = self._active(name)
        if name == ADMIN_USER:
            raise UserError("admin is the node's own user (api.token): rotate it instead", reason="builtin")
        revoked = replace(user, revoked=_now())
        self._write(revoked)
        return revoked

    def ensure_admin(self) -> tuple[User, bool]:
        """The node's own admin, whose credential is ``api.token``; creates either if missing.

        Returns the admin and whether ``api.token`` was adopted as a new credential (the file
        was replaced by hand since the admin was last written).
        """
        path = self.data_dir / TOKEN_FILE
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            token = ""
        except OSError as exc:
            raise CryptoError(f"cannot read API token {path}: {exc.strerror}") from exc
        if len(token) < MIN_TOKEN_CHARS:
            token = new_token()
            _replace_token_file(path, token)
        admin = self._by_name.get(ADMIN_USER)
        now = _now()
        if admin is None:
            admin = User(ADMIN_USER, ADMIN_USER, None, self.pseudonym_of(ADMIN_USER), _digest(token), now, now, 0,
                         "node")
            self._write(admin, insert=True)
            return admin, False
        if hmac.compare_digest(admin.secret, _digest(token)):
            return admin, False
        admin = replace(admin, secret=_digest(token), rotated=now)
        self._write(admin)
        return admin, True

    def _active(self, name: str) -> User:
        user = self._by_name.get(name)
        if user is None:
            raise UserError(f"no user {name}", reason="not_found")
        if not user.active:
            raise UserError(f"user {name} is revoked", reason="revoked")
        return user

    def _write(self, user: User, *, insert: bool = False) -> None:
        values = tuple(getattr(user, c) for c in _COLUMNS)
        with transaction(self._db, f"write user {user.name}") as db:
            if insert:
                db.execute(f"INSERT INTO users VALUES ({', '.join('?' * len(_COLUMNS))})", values)
            else:
                db.execute(f"UPDATE users SET {', '.join(c + ' = ?' for c in _COLUMNS[1:])} WHERE name = ?",
                           (*values[1:], user.name))
        self._cache(user)


def _now() -> int:
    return int(time.time() * 1000)


def _load_key(path: Path, *, create: bool) -> bytes:
    """The institution's pseudonym key (32 random bytes, 0600), created with the user store."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        if not create:
            raise CryptoError(f"user pseudonym key {path} is missing but the user store exists: restore it "
                              "from a backup (a new key would give every user a new pseudonym)") from None
        key = secrets.token_bytes(32)
        write_secret_file(path, key)
        return key
    except OSError as exc:
        raise CryptoError(f"cannot read the user pseudonym key {path}: {exc.strerror}") from exc
    if len(key) != 32:
        raise CryptoError(f"user pseudonym key {path} is {len(key)} bytes, not 32: restore it from a backup "
                          "(a new key would give every user a new pseudonym)")
    return key


def _replace_token_file(path: Path, token: str) -> None:
    """Write ``api.token`` whole or not at all (an empty token file must never be left behind)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    write_secret_file(tmp, token.encode())
    os.replace(tmp, path)


def read_token(data_dir: Path) -> str:
    """The node's own admin credential (``<data_dir>/api.token``), as a local client reads it."""
    path = Path(data_dir) / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise CryptoError(f"cannot read API token {path}: {exc.strerror} (has the node been started?)") from exc
    if len(token) < MIN_TOKEN_CHARS:
        raise CryptoError(f"API token {path} is empty or truncated (restart the node to create a new one)")
    return token
