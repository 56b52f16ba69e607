import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ehrnode import crypto
from ehrnode.errors import CryptoError


def test_signature_verifies_only_for_its_key_and_message():
    seed = os.urandom(32)
    alice, bob = crypto.Identity.from_seed(seed), crypto.Identity.generate()
    sig = Ed25519PrivateKey.from_private_bytes(seed).sign(b"message")  # made elsewhere: checked in full
    assert crypto.verify(alice.public_key, b"message", sig)
    assert crypto.verify(alice.public_key, b"message", sig)  # cached path
    assert not crypto.verify(bob.public_key, b"message", sig)
    assert not crypto.verify(alice.public_key, b"other", sig)
    assert not crypto.verify(alice.public_key, b"message", bytes(64))
    assert not crypto.verify(alice.public_key[:31], b"message", sig)
    assert not crypto.verify(alice.public_key, b"message", sig[:63])


def test_a_signature_this_process_made_verifies_by_lookup_and_nothing_else_does(monkeypatch):
    alice = crypto.Identity.generate()
    sig = alice.sign(b"message")
    checked = []

    class Key:
        def verify(self, signature, message):
            checked.append(message)
            raise crypto.InvalidSignature

    monkeypatch.setattr(crypto, "_public_key", lambda raw: Key())
    assert crypto.verify(alice.public_key, b"message", sig)  # made here: no Ed25519 check
    assert checked == []
    assert not crypto.verify(alice.public_key, b"other", sig)  # anything else is checked in full
    assert not crypto.verify(crypto.Identity.generate().public_key, b"message", sig)
    assert checked == [b"other", b"message"]


def test_domains_separate_signed_messages():
    assert crypto.signing_bytes("a", [1]) != crypto.signing_bytes("b", [1])


def test_key_file_is_private_and_never_overwritten(tmp_path):
    ident = crypto.Identity.generate()
    path = tmp_path / "node.key"
    ident.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert crypto.Identity.load(path).public_key == ident.public_key
    with pytest.raises(CryptoError, match="refusing to overwrite"):
        crypto.Identity.generate().save(path)
    assert crypto.Identity.load(path).public_key == ident.public_key


def test_loading_a_bad_key_file_is_a_clear_error(tmp_path):
    with pytest.raises(CryptoError, match="cannot read"):
        crypto.Identity.load(tmp_path / "missing.key")
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"not a key")
    with pytest.raises(CryptoError, match="not a PEM private key"):
        crypto.Identity.load(junk)


def test_seeded_identities_are_deterministic():
    seed = bytes(range(32))
    assert crypto.Identity.from_seed(seed).public_key == crypto.Identity.from_seed(seed).public_key
    with pytest.raises(CryptoError):
        crypto.Identity.from_seed(b"short")
