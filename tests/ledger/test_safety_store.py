import stat

import pytest

from ehrnode.consensus.safety import SafetyRules
from ehrnode.errors import StoreError
from ehrnode.ledger.safety_store import FileSafetyStore

from ..consensus.factory import Factory

F = Factory()


def test_safety_data_is_durable_private_and_reloaded(tmp_path):
    store = FileSafetyStore(tmp_path / "safety.cbor")
    assert store.load() is None
    rules = SafetyRules(F.vset, 1, F.identities[1], store)
    (b1,) = F.chain([1])
    vote = rules.vote(b1, None)
    assert stat.S_IMODE((tmp_path / "safety.cbor").stat().st_mode) == 0o600
    assert not (tmp_path / "safety.cbor.tmp").exists()
    again = SafetyRules(F.vset, 1, F.identities[1], FileSafetyStore(tmp_path / "safety.cbor"))
    assert again.data.last_vote == vote
    assert again.vote(F.block(1, F.genesis_qc, payload=(b"twin",)), None) == vote


def test_corrupt_safety_data_stops_the_node_instead_of_starting_afresh(tmp_path):
    path = tmp_path / "safety.cbor"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(StoreError) as err:
        SafetyRules(F.vset, 1, F.identities[1], FileSafetyStore(path))
    assert err.value.reason == "corrupt"


def test_an_unwritable_store_is_a_store_error(tmp_path):
    store = FileSafetyStore(tmp_path / "missing-dir" / "safety.cbor")
    with pytest.raises(StoreError, match="cannot write"):
        SafetyRules(F.vset, 1, F.identities[1], store)


def test_a_torn_save_leaves_the_state_before_it(tmp_path):
    """A power cut while a slot is written: its digest fails and the other slot, the state before
    that save (whose vote had been released), is what loads."""
    path = tmp_path / "safety.cbor"
    rules = SafetyRules(F.vset, 1, F.identities[1], FileSafetyStore(path))
    b1, b2 = F.chain([1, 2])
    first = rules.vote(b1, None)
    size = path.stat().st_size
    second = rules.vote(b2, None)
    assert path.stat().st_size == size  # a save writes in place: no rename, no new file
    assert FileSafetyStore(path).load().last_vote == second
    raw = bytearray(path.read_bytes())
    header, slot = 20, (size - 20) // 2
    latest = max((0, 1), key=lambda i: int.from_bytes(raw[header + i * slot:header + i * slot + 8], "big"))
    torn = bytearray(raw)
    torn[header + latest * slot + 20] ^= 0xFF  # a byte of the newer slot did not reach the disk
    path.write_bytes(bytes(torn))
    assert FileSafetyStore(path).load().last_vote == first
    both = bytearray(torn)
    both[header + (1 - latest) * slot + 20] ^= 0xFF
    path.write_bytes(bytes(both))
    with pytest.raises(StoreError) as err:
        FileSafetyStore(path).load()
    assert err.value.reason == "corrupt"


def test_the_earlier_format_is_read_and_rewritten_and_a_larger_state_grows_the_file(tmp_path, monkeypatch):
    from ehrnode import codec
    from ehrnode.consensus.safety import SafetyData
    from ehrnode.ledger import safety_store

    path = tmp_path / "safety.cbor"
    path.write_bytes(codec.encode(SafetyData(epoch=0, restored=True).to_wire()))  # the whole-file format
    store = FileSafetyStore(path)
    assert store.load() == SafetyData(epoch=0, restored=True)
    monkeypatch.setattr(safety_store, "MIN_SLOT", 64)
    store.save(SafetyData(epoch=0))
    assert path.read_bytes().startswith(b"ehrnode-safety")
    assert FileSafetyStore(path).load() == SafetyData(epoch=0)
    small = path.stat().st_size
    rules = SafetyRules(F.vset, 1, F.identities[1], FileSafetyStore(path))
    (b1,) = F.chain([1])
    vote = rules.vote(b1, None)  # a state with a vote in it: larger than the slot, so the file grows
    assert path.stat().st_size > small
    assert FileSafetyStore(path).load().last_vote == vote
