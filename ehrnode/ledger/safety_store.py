"""Durable SafetyData: one small file, replaced atomically and fsynced on every save.

The write goes to a temporary file in the same directory, which is fsynced,
renamed over the old one, and then the directory is fsynced so the rename
itself survives a power cut. A reader therefore sees either the old or the new
state, never a torn one, and a vote is only released once its state is on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import codec
from ..consensus.safety import SafetyData
from ..errors import CodecError, StoreError


class FileSafetyStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> SafetyData | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read safety data {self.path}: {exc.strerror}") from exc
        try:
            return SafetyData.from_wire(codec.decode(raw))
        except CodecError as exc:
            # Never guess: starting with empty safety data could sign a conflicting vote.
            raise StoreError(f"safety data {self.path} is corrupt: {exc}", reason="corrupt") from exc

    def save(self, data: SafetyData) -> None:
        raw = codec.encode(data.to_wire())
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(raw)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StoreError(f"cannot write safety data {self.path}: {exc.strerror}") from exc
