"""The method table (ehrnode/api/methods.py): one place declares every method of the local API."""

import inspect
from pathlib import Path

from ehrnode.api.methods import ALWAYS, BY_NAME, CATALOGUE, NAMES, TABLE, reference
from ehrnode.users.roles import load_roles

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_every_method_is_declared_once_with_a_handler_and_a_summary():
    assert len(TABLE) == len(NAMES) == len(BY_NAME)
    for method in TABLE:
        assert inspect.iscoroutinefunction(method.handler), method.name
        assert method.summary.strip(), method.name
    assert ALWAYS <= NAMES and CATALOGUE.patient <= NAMES and CATALOGUE.methods == NAMES


def test_the_patient_methods_are_the_ones_that_name_a_patient():
    assert CATALOGUE.patient == {"records.list", "audit.disclosures", "audit.trail", "consent.show",
                                 "consent.grant", "consent.revoke"}


def test_the_packaged_roles_name_only_methods_of_the_table():
    roles = load_roles(None, CATALOGUE)  # raises on a name the table does not have
    assert set(roles.roles) >= {"admin", "clinician", "clerk", "researcher", "auditor", "patient"}


def test_docs_api_md_is_the_reference_the_table_gives():
    # Regenerate with: ehrnode api methods --markdown > docs/api.md
    assert DOCS.read_text(encoding="utf-8").strip() == reference().strip()
