"""How well clinical notes are de-identified, and how fast: the notes scrubber measured.

1. Every Synthea note shipped in ``tests/data/synthea`` (DocumentReference attachments), with
   its patient's Patient resource: recall of the patient's known identifiers (each
   occurrence of a name as written, an address line, a city, a ZIP, a phone, an identifier
   value, and each date, which counts only if it was shifted), precision, and the share of
   the other words kept.
2. A generated set (``ehrnode/synthetic_notes.py``): English and Chinese notes with
   identifiers planted in varied forms, and other people's names: recall, precision, words
   kept, notes per second.
3. Throughput of whole DocumentReferences through the ``notes`` profile (decode, scrub,
   encode, the rest of the resource by the rules).

Recall and precision as ``ehrnode/records/deid/measure.py`` counts them.

    python benchmarks/deid_quality.py [--generated 2000] [--seed 7] [--json]
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ehrnode import synthetic_notes
from ehrnode.records.deid import Deidentifier, load_profile
from ehrnode.records.deid.measure import Score, Truth, measure, synthea_truth
from ehrnode.records.deid.notes import PatientFacts

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "synthea"


def synthea() -> tuple[list[tuple[str, dict, list[Truth]]], list[tuple[dict, dict]]]:
    patients = {p["id"]: p for p in map(json.loads, (DATA / "Patient.ndjson").read_text().splitlines())}
    triples, documents = [], []
    for line in (DATA / "DocumentReference.ndjson").read_text().splitlines():
        document = json.loads(line)
        patient = patients[document["subject"]["reference"].split("/", 1)[1]]
        for content in document["content"]:
            text = base64.b64decode(content["attachment"]["data"]).decode("utf-8")
            triples.append((text, patient, synthea_truth(text, patient)))
        documents.append((document, patient))
    return triples, documents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generated", type=int, default=2000, help="generated notes (half English, half Chinese)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    triples, documents = synthea()
    started = time.perf_counter()
    shipped = measure(triples)
    shipped_rate = len(triples) / (time.perf_counter() - started)

    notes = synthetic_notes.notes(args.generated, seed=args.seed)
    started = time.perf_counter()
    by_language, generated = {}, Score()
    for language in ("en", "zh"):
        subset = [n for n in notes if n.language == language]
        score = measure((n.text, n.patient, n.planted) for n in subset)
        generated += score
        by_language[language] = {"notes": len(subset), "recall": round(score.recall, 5),
                                 "precision": round(score.precision, 5), "words_kept": round(score.kept, 5)}
    generated_rate = len(notes) / (time.perf_counter() - started)

    deid = Deidentifier(load_profile("notes"), bytes(range(32)))
    facts = {p["id"]: PatientFacts.of(p) for _, p in documents}
    started = time.perf_counter()
    for document, patient in documents:
        deid.deidentify(document, patient=patient["id"], facts=facts[patient["id"]])
    documents_rate = len(documents) / (time.perf_counter() - started)

    result = {
        "synthea_notes": {"notes": len(triples), **shipped.view(), "notes_per_second": round(shipped_rate)},
        "generated_notes": {"notes": len(notes), "seed": args.seed, **generated.view(),
                            "notes_per_second": round(generated_rate), "by_language": by_language},
        "document_references_per_second": round(documents_rate),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    for name, block in (("Synthea notes (shipped)", result["synthea_notes"]),
                        ("generated notes", result["generated_notes"])):
        print(f"{name}: {block['notes']} notes, {block['identifiers']} identifiers")
        print(f"  recall {block['recall']:.4f}  precision {block['precision']:.4f}  "
              f"words kept {block['words_kept']:.4f}"
              f"  {block['notes_per_second']} notes/s  missed {block['missed'] or 'none'}")
    for language, block in by_language.items():
        print(f"  {language}: {block['notes']} notes, recall {block['recall']:.4f}, precision {block['precision']:.4f},"
              f" words kept {block['words_kept']:.4f}")
    print(f"DocumentReferences through the notes profile: {result['document_references_per_second']}/s")
    for example in shipped.examples + generated.examples:
        print(f"  missed {example}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
