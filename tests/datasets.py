"""Where the test data shipped with the repository lives (see tests/data/README.md)."""

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
#: FHIR R4 bulk NDJSON of 12 Synthea patients, with the providers and places they refer to.
SYNTHEA = DATA / "synthea"
#: The FEBRL record-linkage sets (dataset1.csv, dataset2.csv, dataset3.csv).
FEBRL = DATA / "febrl"
