"""Recording new Patients into a large vault under k-anonymity (k > 1).

Each Patient recorded is given the lowest generalization level at which its released
quasi-identifiers (birth, gender, region) are shared by k patients, counting what every
Patient recorded before released. This fills one institution's vault (in this process, with
the OPRF evaluated locally) with ``--patients`` synthetic Patients, then times recording one
more Patient at a time, and reports what is left of that time with k-anonymity off.

    python benchmarks/kanon_ingest.py [--patients 20000] [--k 2] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ehrnode import crypto, synthetic
from ehrnode.empi.encoding import Encoder
from ehrnode.records import fhir
from ehrnode.records.deid import Deidentifier, load_profile
from ehrnode.records.keys import RecordKeys
from ehrnode.records.recorder import Recorder
from ehrnode.records.vault import Vault

BATCH = 2000
TIMED = 5


def recorder(root: Path, k: int) -> Recorder:
    profile_path = root / f"k{k}.toml"
    profile_path.write_text(f'[profile]\nname = "k{k}"\nextends = "default"\n\n[kanonymity]\nk = {k}\n')
    keys = RecordKeys.derive(os.urandom(32), os.urandom(32))
    member = crypto.MemberKeys(crypto.Identity.generate(), crypto.SealingKey.generate())
    return Recorder(vault=Vault(root / "vault.sqlite3", keys, member), keys=keys,
                    deidentifier=Deidentifier(load_profile(profile_path), keys.deid), institution="A",
                    chain_id="bench", member=member, encoder=Encoder(os.urandom(32), oprf_key=0x5EED))


def patients(people: list[synthetic.Person]) -> list[fhir.Item]:
    return [fhir.Item(f"bench:{i}", synthetic.patient_resources(p, "A", visits=0)[0]) for i, p in enumerate(people)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    people = synthetic.people(args.patients + 2 * TIMED, seed=5)
    figures: dict[str, object] = {"patients": args.patients, "k": args.k}
    with tempfile.TemporaryDirectory(prefix="ehrnode-kanon-") as tmp:
        rec = recorder(Path(tmp), args.k)
        start = time.perf_counter()
        for at in range(0, args.patients, BATCH):
            rec.record(patients(people[at:min(args.patients, at + BATCH)]), now_ms=1)
        figures["fill_seconds"] = round(time.perf_counter() - start, 1)
        for label, k in (("one_more_ms", args.k), ("one_more_k1_ms", 1)):
            rec.deid.profile = dataclasses.replace(rec.deid.profile, k=k)
            offset = args.patients + (0 if k == args.k else TIMED)
            times = []
            for person in people[offset:offset + TIMED]:
                start = time.perf_counter()
                rec.record(patients([person]), now_ms=1)
                times.append(1000 * (time.perf_counter() - start))
            figures[label] = round(statistics.median(times), 1)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"vault of {args.patients:,} Patients, k = {args.k}: filled in {figures['fill_seconds']} s")
    print(f"recording one more Patient: median {figures['one_more_ms']} ms with k = {args.k}, "
          f"{figures['one_more_k1_ms']} ms with k-anonymity off ({TIMED} each)")


if __name__ == "__main__":
    main()
