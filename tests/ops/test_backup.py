"""Backup and restore: an online encrypted snapshot; a node rebuilt from it rejoins, catches up, signs again."""

import dataclasses
import json
import shutil
import sqlite3

import pytest
import trio

from ehrnode import synthetic
from ehrnode.backup import BackupError, create_backup, restore_backup
from ehrnode.client import ApiClient
from ehrnode.consensus.safety import MemorySafetyStore, SafetyData, SafetyRules
from ehrnode.consensus.survey import RoundSurvey, encode_answer
from ehrnode.errors import ConfigError, InvalidMessage, SafetyViolation
from ehrnode.ledger.safety_store import FileSafetyStore
from ehrnode.localnet import LocalConsortium
from ehrnode.records.fhir import Item
from ehrnode.records.submit import add_items
from tests.commands import cli

from ..consensus.factory import Factory

PASSPHRASE = "correct horse battery staple"



def test_a_node_restored_from_an_online_backup_rejoins_catches_up_and_signs_again(tmp_path):
    c = LocalConsortium(tmp_path / "consortium")
    c.start_all()
    try:
        trio.run(c.wait_ready)
        people = synthetic.people(3, seed=9)
        items = [Item(f"in:{i}", r) for i, r in enumerate(
            r for p in people for r in synthetic.patient_resources(p, "A", visits=1, seed=9))]

        async def record():
            async with ApiClient.connect(c.configs["A"]) as client:
                return await add_items(client, items, timeout=60)

        rows = trio.run(record).records
        config = c.configs["A"]
        user = trio.run(lambda: c.call("A", "users.add", name="dr.ana", role="clinician"))
        (tmp_path / "pass").write_text(PASSPHRASE + "\n")
        out = tmp_path / "a.backup"
        # Online: A keeps running (and committing) while the backup is taken.
        result = cli("backup", "--config", config.path, "--out", out, "--passphrase-file", tmp_path / "pass",
                     "--json")
        assert result.returncode == 0, result.stderr
        manifest = json.loads(result.stdout)
        assert manifest["heights"]["vault"] == len(rows) and manifest["heights"]["blocks"] > 0
        assert oct(out.stat().st_mode & 0o777) == "0o600"
        blob = out.read_bytes()
        assert b"SQLite format" not in blob and config.master_key_path.read_bytes() not in blob
        assert b"PRIVATE KEY" not in blob
        assert not list(tmp_path.glob(".ehrnode-backup-*"))  # snapshots removed

        # The disk is lost: kill A, remove its data directory and keys.
        c.kill9("A")
        shutil.rmtree(config.data_dir)
        shutil.rmtree(config.signing_key_path.parent)
        trio.run(lambda: c.wait_height(["B", "C", "R"], manifest["heights"]["blocks"] + 3, timeout=120))

        wrong = tmp_path / "wrong"
        wrong.write_text("not the passphrase at all")
        refused = cli("restore", out, "--config", config.path, "--passphrase-file", wrong)
        assert refused.returncode == 2 and "wrong passphrase" in refused.stderr
        assert not config.data_dir.exists() or not any(config.data_dir.iterdir())
        restored = cli("restore", out, "--config", config.path, "--passphrase-file", tmp_path / "pass")
        assert restored.returncode == 0, restored.stderr
        assert FileSafetyStore(config.data_dir / "safety.cbor").load().restored

        c.start("A")
        trio.run(lambda: c.wait_ready(timeout=60))
        target = trio.run(lambda: c.height("B"))
        trio.run(lambda: c.wait_height(["A"], target, timeout=120))

        async def resumed():
            with trio.fail_after(90):
                while '"event": "restore.resumed"' not in c.log("A"):
                    await trio.sleep(0.2)

        trio.run(resumed)
        assert not FileSafetyStore(config.data_dir / "safety.cbor").load().restored
        # A signs again: with B down, commits need A's votes (A, C and R are the quorum).
        c.stop("B")
        before = trio.run(lambda: c.height("C"))
        trio.run(lambda: c.wait_height(["A", "C", "R"], before + 5, timeout=120))
        show = trio.run(lambda: c.call("A", "records.show", record_id=rows[0]["record_id"]))
        assert show["resource"]["id"] == items[0].resource["id"]
        assert trio.run(lambda: c.call("A", "vault.verify"))["ok"]
        # Its users came back: same credential, same pseudonym.

        async def whoami():
            async with ApiClient.connect(config, user="dr.ana", credential=user["credential"]) as client:
                return await client.call("users.whoami")

        assert trio.run(whoami)["pseudonym"] == user["pseudonym"]
        # A restore never runs over live data.
        again = cli("restore", out, "--config", config.path, "--passphrase-file", tmp_path / "pass")
        assert again.returncode == 2 and "move the data directory away" in again.stderr
    finally:
        c.stop_all()


def test_a_changed_or_truncated_backup_is_refused(tmp_path):
    c = LocalConsortium(tmp_path / "consortium")
    config = c.configs["B"]
    config.data_dir.mkdir(parents=True, exist_ok=True)
    for name in ("blocks.sqlite3", "state.sqlite3"):
        db = sqlite3.connect(config.data_dir / name)
        db.execute("CREATE TABLE t (x)")
        db.execute("INSERT INTO t VALUES (randomblob(2500000))")  # a few chunks' worth
        db.commit()
        db.close()
    out = tmp_path / "b.backup"
    with pytest.raises(BackupError):
        create_backup(config, out, "short")
    # A key file that is a symlink (as mounted secrets are) is backed up as the file it points to.
    real = tmp_path / "sealing.pem"
    real.write_bytes(config.sealing_key_path.read_bytes())
    config.sealing_key_path.unlink()
    config.sealing_key_path.symlink_to(real)
    create_backup(config, out, PASSPHRASE)
    with pytest.raises(BackupError):
        create_backup(config, out, PASSPHRASE)  # never overwrites
    data = out.read_bytes()
    target = LocalConsortium(tmp_path / "other")  # a different consortium: a different genesis
    shutil.rmtree(config.data_dir)
    header = 17 + 16 + 3  # magic, salt, scrypt cost
    chunks, at = [], header
    while at < len(data):
        size = int.from_bytes(data[at:at + 4], "big")
        chunks.append(data[at:at + 4 + size])
        at += 4 + size
    assert len(chunks) >= 2
    for name, blob in (("flipped", data[:100] + bytes([data[100] ^ 1]) + data[101:]),
                       ("truncated", data[:-20]), ("cut", data[: len(data) // 2]), ("empty", b""),
                       ("no final chunk", data[:header] + b"".join(chunks[:-1])),
                       ("reordered", data[:header] + b"".join([chunks[1], chunks[0], *chunks[2:]])),
                       ("trailing", data + b"\0")):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(BackupError):
            restore_backup(config, tmp_path / name, PASSPHRASE)
        assert not (config.data_dir / "safety.cbor").exists(), name  # nothing left behind
        assert not list(config.data_dir.glob(".restore-*")), name
    restore_backup(config, out, PASSPHRASE)  # the intact one restores (keys present: the same keys)
    assert (config.data_dir / "state.sqlite3").exists() and (config.data_dir / "safety.cbor").exists()
    shutil.rmtree(config.data_dir)
    with pytest.raises(ConfigError):
        restore_backup(target.configs["B"], out, PASSPHRASE)


def test_restored_safety_data_signs_nothing_until_the_survey_sets_a_floor():
    f = Factory(4)
    blocks = f.chain([1, 2, 3, 4])
    qc3, qc4 = f.qc(blocks[2]), f.qc(blocks[3])
    tc5 = f.tc(5, [qc4, qc4, qc3])
    store = MemorySafetyStore()
    store.data = SafetyData(epoch=0, restored=True)
    rules = SafetyRules(f.vset, 0, f.identities[0], store)
    for sign in (lambda: rules.timeout(4, qc3, None), lambda: rules.vote(blocks[3], None),
                 lambda: rules.propose(f.block(4, qc3, author=0))):
        with pytest.raises(SafetyViolation) as refused:
            sign()
        assert refused.value.reason == "restored"

    survey = RoundSurvey.fresh(f.vset, 0)
    survey.add(1, encode_answer(survey.nonce, qc3, None))
    survey.add(1, encode_answer(survey.nonce, qc3, None))  # the same validator twice counts once
    survey.add(2, encode_answer(b"x" * 16, qc4, tc5))  # an answer to another survey: ignored
    survey.add(0, encode_answer(survey.nonce, qc4, tc5))  # itself: ignored
    assert survey.result() is None
    with pytest.raises(InvalidMessage):
        survey.add(3, b"garbage")
    forged = dataclasses.replace(qc4, signatures=qc4.signatures[:1] + ((1, b"\0" * 64),) + qc4.signatures[2:])
    with pytest.raises(InvalidMessage):
        survey.add(3, encode_answer(survey.nonce, forged, None))  # certificates are verified
    survey.add(2, encode_answer(survey.nonce, qc4, None))
    survey.add(3, encode_answer(survey.nonce, qc3, tc5))
    qc, tc = survey.result()
    assert (qc.round, tc.round) == (4, 5)
    floor = rules.lift_restore(qc, tc)
    # Highest certified round 5: the validator may have voted or proposed up to round 7.
    assert floor == 7 and not store.data.restored and store.data.locked_round == 4
    block7 = f.block(7, qc4)
    with pytest.raises(SafetyViolation) as old:
        rules.vote(f.block(7, f.qc(f.block(6, qc4))), None)
    assert old.value.reason == "old_round"
    with pytest.raises(SafetyViolation) as twice:
        rules.propose(dataclasses.replace(block7, author=0))
    assert twice.value.reason == "proposed_twice"
    # Timeouts go on (else the others could wait for this one below the floor), never below the lock.
    with pytest.raises(SafetyViolation) as below:
        rules.timeout(4, qc3, None)
    assert below.value.reason == "below_lock"
    assert rules.timeout(6, qc4, tc).round == 6
    assert rules.vote(f.block(8, f.qc(block7)), None).round == 8
    # The floor survives a restart.
    assert SafetyRules(f.vset, 0, f.identities[0], store).data.vote_floor == 7
