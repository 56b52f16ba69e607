import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from ehrnode import codec, synthetic
from ehrnode.errors import IntegrityError
from ehrnode.records import fhir
from ehrnode.records.canonical import canonical_json
from ehrnode.records.deid import Deidentifier, load_profile
from ehrnode.records.deid.notes import PatientFacts
from ehrnode.records.keys import open_sealed
from ehrnode.records.workers import POOL_THRESHOLD, Preparer

KEY = b"k" * 32


def preparer(workers):
    return Preparer(Deidentifier(load_profile(None), KEY), None, KEY, workers=workers)


def items(count):
    people = synthetic.people(count // 7 + 1, seed=3)
    resources = [r for p in people for r in synthetic.patient_resources(p, "A", visits=2, seed=3)]
    return [fhir.Item(f"input:{k}", r) for k, r in enumerate(resources[:count])]


def canonical(items):
    return [canonical_json(i.resource) for i in items]


def workers_running():
    return [p for p in multiprocessing.active_children() if "SpawnProcess" in p.name]


def test_started_workers_are_the_ones_a_large_input_uses_and_close_stops_them():
    before = len(workers_running())
    p = preparer(2)
    try:
        assert p.start() == 2
        started = {w.pid for w in workers_running()}
        assert len(started) == before + 2
        large = items(POOL_THRESHOLD + 10)
        assert p.validate(large) == canonical(large)  # in the workers, same answers
        assert {w.pid for w in workers_running()} == started  # no second pool
    finally:
        p.close()
    assert len(workers_running()) == before
    assert p.start() == 0  # closed: nothing starts again, and inputs run in the calling thread
    assert p.validate(large) == canonical(large)
    assert len(workers_running()) == before


def test_workers_answer_what_the_calling_thread_would_problems_and_releases_included():
    large = items(POOL_THRESHOLD + 10)
    large[3] = fhir.Item("input:3", {**large[3].resource, "status": 5})
    large[7] = fhir.Item("input:7", {**large[7].resource, "id": "x" * 70})
    patients = {i.resource["id"]: i.resource for i in large if i.resource["resourceType"] == "Patient"}
    pool, alone = preparer(2), preparer(1)
    try:
        pool.start()
        checked = pool.validate(large)
        assert checked == alone.validate(large)
        assert [type(c) for c in checked].count(fhir.Problem) == 2
        assert isinstance(checked[3], fhir.Problem) and isinstance(checked[7], fhir.Problem)
        jobs = [(c, fhir.patient_id(i.resource), 0, PatientFacts.of(patients.get(fhir.patient_id(i.resource))))
                for i, c in zip(large, checked, strict=True) if isinstance(c, bytes)]
        jobs.append((canonical_json({"resourceType": "Observation", "id": "o", "status": "final"}), "p", 99, None))
        released = list(pool.deidentify(jobs))
        in_thread = list(alone.deidentify(jobs))
        assert [r if isinstance(r, str) else r.release for r in released] == \
            [r if isinstance(r, str) else r.release for r in in_thread]
        assert isinstance(released[-1], str)  # no such k-anonymity level: a reason, not a release
        deid = Deidentifier(load_profile(None), KEY)
        for (raw, pid, level, facts), out in zip(jobs[:-1], released, strict=False):
            assert not isinstance(out, str)
            assert out.release == canonical_json(deid.deidentify(json.loads(raw), patient=pid, level=level,
                                                                 facts=facts))
            assert_entry_material(raw, out)
        # Each release gets its own record id, salt and data keys, in the workers as in the thread.
        made = [r for r in released + in_thread if not isinstance(r, str)]
        for part in ("record_id", "commitment", "payload"):
            assert len({getattr(r, part) for r in made}) == len(made)
        assert len({r.encrypted.raw_key for r in made} | {r.encrypted.deid_key for r in made}) == 2 * len(made)
    finally:
        pool.close()


def assert_entry_material(raw, made):
    """What a worker made for a vault entry opens to the resource and its release, bound to its
    record id, and the commitment is over the salt it carries."""
    enc = made.encrypted
    assert open_sealed(enc.raw_key, enc.raw, made.record_id + b"raw", "raw") == raw
    assert open_sealed(enc.deid_key, enc.deid, made.record_id + b"deid", "deid") == made.payload
    with pytest.raises(IntegrityError):
        open_sealed(enc.raw_key, enc.raw, bytes(16) + b"raw", "raw")  # another record's id
    assert enc.record_id == made.record_id
    assert enc.raw_key.hex() not in repr(made) and enc.deid_key.hex() not in repr(made)  # logs show no key
    payload = codec.decode(made.payload)
    assert payload["resource"] == made.release
    assert made.commitment == hashlib.sha256(payload["salt"] + made.release).digest()


def _models_loaded() -> int:
    return sum(f"fhir.resources.R4B.{rtype.lower()}" in sys.modules for rtype in fhir.patient_data_types())


def test_a_worker_starts_with_the_model_of_every_record_type_loaded():
    assert fhir.load_models() == len(fhir.patient_data_types())  # each type a record may be has a model
    p = preparer(2)
    try:
        p.start()
        pool = p._pool_now()
        # Before any input: the first one does not wait for imports.
        assert pool.submit(_models_loaded).result() == len(fhir.patient_data_types())
    finally:
        p.close()


def test_a_pool_whose_worker_died_fails_that_input_and_the_next_starts_a_new_one():
    p = preparer(2)
    large = items(POOL_THRESHOLD + 10)
    try:
        p.start()
        for worker in workers_running():
            os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(BrokenProcessPool):
            p.validate(large)
        assert p.validate(large) == canonical(large)  # in a new pool
    finally:
        p.close()


def test_without_a_pool_nothing_starts_and_everything_runs_in_the_calling_thread():
    before = len(workers_running())
    p = preparer(1)
    assert p.start() == 0
    large = items(POOL_THRESHOLD)
    assert p.validate(large) == canonical(large)
    assert len(workers_running()) == before
    p.close()


NODE = """
import multiprocessing, sys, time
from ehrnode.records.deid import Deidentifier, load_profile
from ehrnode.records.workers import Preparer

if __name__ == "__main__":
    key = b"k" * 32
    Preparer(Deidentifier(load_profile(None), key), None, key, workers=2).start()
    print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    time.sleep(600)
"""


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended, whoever is to reap it


def test_workers_end_when_their_node_is_killed(tmp_path):
    script = tmp_path / "node.py"
    script.write_text(NODE)
    node = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    try:
        workers = [int(pid) for pid in node.stdout.readline().split()]
        assert len(workers) == 2 and all(alive(pid) for pid in workers)
    finally:
        node.send_signal(signal.SIGKILL)
        node.wait(10)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers)
