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
