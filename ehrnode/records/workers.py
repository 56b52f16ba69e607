"""Validation and de-identification spread over worker processes, for large inputs.

Both are pure functions of one resource and cost most of an ingest's CPU time
(model validation about 0.4 ms a resource, de-identification about 0.2 ms), so
an input of thousands of resources is split over a pool of processes, one per
core by default. The pool starts with the node (:meth:`Preparer.start`; about a
second of CPU a worker, for its imports, the FHIR model of every record type
included), or, when a node is told not to, on the first large input, which then
waits for it. Workers are started
with ``spawn``, so one never inherits the node's threads or sockets, and live as
long as the node. Small inputs, and nodes configured with no workers, run in
the calling thread: a process round-trip costs more than it saves there.

Validation answers each valid resource's canonical JSON (what the vault
stores), and de-identification takes those bytes and answers the canonical JSON
of the release (what the commitment is computed over and the vault seals):
pickling a resource's nested dicts to a worker and back cost the node about as
much time as the pool took off it. (The input itself goes to validation as it
came: writing its JSON in the node before sending it was slower still.)

With each release, a worker also makes what the resource's vault entry needs
that does not depend on the entry's position (:class:`Released`): its record
id, salted commitment, and both ciphertexts under fresh data keys. The node
then checks that these fit the entry, takes the ciphertexts' digests, links
each entry to the one before, signs it and wraps its keys, in order: sealing
whole entries in the node took longer than the workers took to release them,
so the node's sealing, not the workers, had set the pace of an ingest.

Results come back in input order; a worker never writes anything.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from .. import codec
from ..errors import DeidentificationError
from . import fhir
from .canonical import canonical_json, commitment, new_salt
from .deid import Deidentifier, load_profile
from .deid.notes import PatientFacts
from .vault import RECORD_ID_SIZE, Encrypted, encrypt

_T = TypeVar("_T")

#: Inputs smaller than this run in the calling thread.
POOL_THRESHOLD = 500

#: How often a worker checks that the node that started it is still there (seconds).
PARENT_CHECK = 1.0

_worker_deid: Deidentifier | None = None


def _init_worker(profile_path: Path | str | None, key: bytes, parent: int) -> None:
    global _worker_deid
    _worker_deid = Deidentifier(load_profile(profile_path), key)
    threading.Thread(target=_exit_without, args=(parent,), name="parent-watch", daemon=True).start()
    fhir.load_models()


def _exit_without(parent: int) -> None:
    """End this worker once the node that started it is gone (killed, say, rather than stopped,
    which shuts its workers down): a worker is never left behind."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK)
    os._exit(0)


def _started() -> None:
    """Nothing: submitted once a worker, so that each is started (one that ran it is ready)."""


#: What validating an item finds: the resource's canonical JSON if it is valid, else its problem.
Checked = bytes | fhir.Problem


def _check(item: fhir.Item) -> Checked:
    return fhir.validate(item) or canonical_json(item.resource)


def _validate_chunk(items: list[fhir.Item]) -> list[Checked]:
    return [_check(item) for item in items]


#: One resource to release: its canonical JSON, its patient's id, that patient's k-anonymity
#: level, and what the patient's own resource says (for scrubbing free text).
Job = tuple[bytes, str, int, "PatientFacts | None"]


class Released(NamedTuple):
    """One resource released, with what its vault entry needs that does not depend on the
    entry's position (the node adds its header, chain link and signature, in order)."""

    release: bytes  # canonical JSON of the de-identified resource
    commitment: bytes  # over a fresh salt and ``release``
    payload: bytes  # canonical CBOR {"salt", "resource"}: what the vault keeps of the release
    encrypted: Encrypted  # the resource as received and ``payload``, for a new record id

    @property
    def record_id(self) -> bytes:
        return self.encrypted.record_id


def released(raw: bytes, release: bytes) -> Released:
    """The entry material of a resource whose canonical JSON is ``raw`` and release ``release``:
    a new record id, a salted commitment, both encrypted."""
    record_id, salt = os.urandom(RECORD_ID_SIZE), new_salt()
    payload = codec.encode({"salt": salt, "resource": release})
    return Released(release, commitment(salt, release), payload, encrypt(record_id, raw, payload))


#: What de-identifying one resource gives: its release, or why it cannot be released.
Release = Released | str


def _deidentify_chunk(jobs: list[Job]) -> list[Release]:
    assert _worker_deid is not None
    return [_deidentify_one(_worker_deid, job) for job in jobs]


def _deidentify_one(deid: Deidentifier, job: Job) -> Release:
    raw, patient, level, facts = job
    try:
        release = canonical_json(deid.deidentify(json.loads(raw), patient=patient, level=level, facts=facts))
    except DeidentificationError as exc:
        return str(exc)
    return released(raw, release)


def default_workers() -> int:
    return min(os.cpu_count() or 1, 8)


class Preparer:
    """Blocking: one input at a time, but :meth:`validate` may also run for another input (staged
    input validated ahead, :mod:`ehrnode.api.records`) in another thread, sharing the pool;
    :meth:`start` and :meth:`close` may come from other threads."""

    def __init__(self, deid: Deidentifier, profile_path: Path | str | None, key: bytes, *, workers: int) -> None:
        self.deid = deid
        self._profile_path = profile_path
        self._key = key
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()  # start() and inputs run in threads
        self._closed = False

    def start(self) -> int:
        """Start the worker processes now rather than on the first large input (blocking: call it
        in a thread); returns once one is ready, with how many were started (0: no pool)."""
        pool = self._pool_now() if self.workers >= 2 else None
        if pool is None:
            return 0
        # A spawning pool starts a process for each task that finds none idle.
        self._in(pool, lambda: [f.result() for f in [pool.submit(_started) for _ in range(self.workers)]])
        return self.workers

    def pooled(self, count: int) -> bool:
        """Whether an input of ``count`` items is spread over the worker processes."""
        return self.workers >= 2 and count >= POOL_THRESHOLD

    def _use_pool(self, count: int) -> ProcessPoolExecutor | None:
        return self._pool_now() if self.pooled(count) else None

    def _pool_now(self) -> ProcessPoolExecutor | None:
        """The pool, started if need be; None once closed (inputs then run in the calling thread)."""
        with self._pool_lock:
            if self._closed:
                return None
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                    initargs=(self._profile_path, self._key, os.getpid()),
                )
            return self._pool

    def _in(self, pool: ProcessPoolExecutor, work: Callable[[], _T]) -> _T:
        """``work()`` on ``pool``; a pool that broke (a worker died) is dropped, so the next input
        starts a new one instead of failing the same way."""
        try:
            return work()
        except BrokenProcessPool:
            self._drop(pool)
            raise

    def _drop(self, pool: ProcessPoolExecutor) -> None:
        with self._pool_lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def _chunks(self, values: Sequence[Any]) -> list[list[Any]]:
        size = max(1, -(-len(values) // (self.workers * 4)))
        return [list(values[i:i + size]) for i in range(0, len(values), size)]

    def validate(self, items: Sequence[fhir.Item]) -> list[Checked]:
        """Each item's canonical JSON (bytes) if it is valid, else its problem."""
        pool = self._use_pool(len(items))
        if pool is None:
            return [_check(item) for item in items]
        return self._in(pool, lambda: [p for chunk in pool.map(_validate_chunk, self._chunks(items)) for p in chunk])

    def deidentify(self, jobs: Sequence[Job]) -> Iterator[Release]:
        """Each job's release (:class:`Released`), or the reason it cannot be released (a
        string), in order, each as soon as it is ready: the caller may work on the first ones
        while the workers release the rest."""
        pool = self._use_pool(len(jobs))
        if pool is None:
            for job in jobs:
                yield _deidentify_one(self.deid, job)
            return
        try:
            for chunk in pool.map(_deidentify_chunk, self._chunks(jobs)):
                yield from chunk
        except BrokenProcessPool:
            self._drop(pool)
            raise

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool, self._closed = self._pool, None, True
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
