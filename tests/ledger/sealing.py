"""Epoch keys for ledger tests: one member's key for epoch 0, and transactions sealed with it."""

from ehrnode import crypto
from ehrnode.epochs import EpochGrant, EpochKeys
from ehrnode.ledger.envelope import Envelope


def keyring(chain_id: str, member: str = "A") -> EpochKeys:
    sealing = crypto.SealingKey.generate()
    keys = EpochKeys(chain_id, member, sealing)
    assert keys.learn(EpochGrant.create(chain_id, 0, {member: sealing.public_key}))
    return keys


def sealed(tx, keys: EpochKeys, epoch: int = 0) -> bytes:
    return Envelope.seal(tx, epoch=epoch, key=keys.aead(epoch), chain_id=keys.chain_id).encoded
