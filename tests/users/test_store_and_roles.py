"""Users, roles and the credential throttle, without a network."""

import pytest

from ehrnode.api.methods import ALWAYS, CATALOGUE
from ehrnode.errors import ConfigError, CryptoError
from ehrnode.users.auth import (
    FAILURE_DELAY,
    FORGET_AFTER,
    FREE_FAILURES,
    MAX_DELAY,
    NOT_A_NAME,
    Throttle,
    authenticate,
    delay_for,
)
from ehrnode.users.roles import load_roles
from ehrnode.users.store import USERS_KEY, UserError, UserStore, pseudonym_bytes, pseudonym_text

EMPI = "E" + "A" * 24


def test_the_packaged_roles_give_each_role_its_permissions():
    roles = load_roles(None, CATALOGUE)
    clinician, clerk, researcher = roles.get("clinician"), roles.get("clerk"), roles.get("researcher")
    auditor, patient, admin = roles.get("auditor"), roles.get("patient"), roles.get("admin")
    assert clinician.permits("records.pull", "treatment") and clinician.permits("records.pull", "emergency")
    assert not clinician.permits("records.pull", "research") and not clinician.permits("users.add")
    # A patient's or a record's trail, not a colleague's activity.
    assert clinician.permits("audit.trail", "patient") and clinician.permits("audit.trail", "record")
    assert not clinician.permits("audit.trail", "user") and not clinician.permits("audit.trace")
    assert clerk.permits("records.add") and not clerk.permits("records.show")
    assert not clerk.permits("records.pull", "treatment")
    assert researcher.permits("records.pull", "research") and not researcher.permits("records.pull", "treatment")
    assert auditor.permits("audit.whois") and auditor.permits("audit.trail")
    assert not auditor.permits("records.show") and not auditor.permits("records.pull", "treatment")
    assert patient.patient and patient.permits("audit.disclosures") and not patient.permits("audit.trace")
    assert admin.permits("users.revoke") and admin.permits("records.pull", "research")
    # Every user may ask who they are, whatever their role: the method table says so.
    assert ALWAYS == {"users.whoami"}
    assert all(roles.get(name).permits("users.whoami") for name in roles.roles)


@pytest.mark.parametrize("text,needle", [
    ("[roles.admin]\nallow = ['*']\n[roles.x]\nallow = ['records.delete']\n", "records.delete"),
    ("[roles.admin]\nallow = ['*']\n[roles.x]\nallow = ['records.pull:fun']\n", "records.pull:fun"),
    ("[roles.admin]\nallow = ['*']\n[roles.x]\nallow = ['audit.trail:everyone']\n", "audit.trail:everyone"),
    ("[roles.admin]\nallow = ['*']\n[roles.x]\nallow = ['records.add:treatment']\n", "records.add:treatment"),
    ("[roles.admin]\nallow = ['*']\n[roles.p]\npatient = true\nallow = ['records.show']\n", "records.show"),
    ("[roles.admin]\nallow = ['*']\n[roles.p]\npatient = true\nallow = ['consent.*']\n", "consent.*"),
    ("[roles.clinician]\nallow = ['*']\n", "admin"),
    ("[roles.admin]\nallow = ['status']\n", "admin"),
    ("[roles.admin]\nallow = ['*']\n[roles.Bad]\nallow = []\n", "Bad"),
    ("[roles.admin]\nallow = ['*']\ncolour = 'red'\n", "colour"),
    ("[roles.admin]\nallow = ['*']\n[other]\n", "top level"),
    ("not toml [", "TOML"),
])
def test_a_bad_roles_file_names_the_problem(tmp_path, text, needle):
    path = tmp_path / "roles.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_roles(path, CATALOGUE)
    assert needle in str(error.value) and str(path) in str(error.value)


def test_users_are_added_rotated_revoked_and_never_reused(tmp_path):
    store = UserStore(tmp_path, "A")
    ana, token = store.add("dr.ana", "clinician", empi=None, by="admin", patient_role=False)
    assert store.by_token(token) == ana and store.by_token(token + "x") is None
    assert token.encode() not in (tmp_path / "users.db").read_bytes()  # only its hash is kept
    rotated, token2 = store.rotate("dr.ana")
    assert store.by_token(token) is None and store.by_token(token2) == rotated
    assert rotated.pseudonym == ana.pseudonym
    revoked = store.revoke("dr.ana")
    assert not revoked.active and store.by_token(token2) == revoked  # found, so refused as revoked
    with pytest.raises(UserError, match="never reused"):
        store.add("dr.ana", "clinician", empi=None, by="admin", patient_role=False)
    with pytest.raises(UserError, match="revoked"):
        store.rotate("dr.ana")
    with pytest.raises(UserError, match="needs --empi"):
        store.add("pat", "patient", empi=None, by="admin", patient_role=True)
    with pytest.raises(UserError, match="user name"):
        store.add("Dr Ana", "clinician", empi=None, by="admin", patient_role=False)
    pat, _ = store.add("pat", "patient", empi=EMPI, by="admin", patient_role=True)
    assert pat.empi == EMPI
    admin, _ = store.ensure_admin()
    with pytest.raises(UserError, match="rotate it instead"):
        store.revoke("admin")
    # Everything survives a restart.
    store.close()
    again = UserStore(tmp_path, "A")
    assert again.get("dr.ana") == revoked and again.get("pat") == pat and again.ensure_admin() == (admin, False)
    assert again.whois(pat.pseudonym) == pat


def test_pseudonyms_are_keyed_per_institution(tmp_path):
    a = UserStore(tmp_path / "a", "A") if (tmp_path / "a").mkdir() is None else None
    b = UserStore(tmp_path / "b", "B") if (tmp_path / "b").mkdir() is None else None
    assert a.pseudonym_of("dr.ana") != b.pseudonym_of("dr.ana")
    assert a.pseudonym_of("dr.ana") == a.pseudonym_of("dr.ana") != a.pseudonym_of("dr.bo")
    text = pseudonym_text(a.pseudonym_of("dr.ana"))
    assert text.startswith("U") and len(text) == 25 and pseudonym_bytes(text) == a.pseudonym_of("dr.ana")
    with pytest.raises(UserError):
        pseudonym_bytes("dr.ana")
    # Losing the key while users exist would silently give everyone new pseudonyms: refused.
    a.add("dr.ana", "clinician", empi=None, by="admin", patient_role=False)
    a.close()
    (tmp_path / "a" / USERS_KEY).unlink()
    with pytest.raises(CryptoError, match="restore it"):
        UserStore(tmp_path / "a", "A")


def test_failed_credentials_are_answered_later_and_later_but_never_lock_a_user_out(tmp_path):
    store = UserStore(tmp_path, "A")
    _, token = store.add("dr.ana", "clinician", empi=None, by="admin", patient_role=False)
    _, other = store.add("dr.bo", "clinician", empi=None, by="admin", patient_role=False)
    throttle = Throttle()
    now = 1000.0
    delays = []
    for _ in range(FREE_FAILURES + 6):
        refused = authenticate(store, throttle, "wrong", "dr.ana", now)
        assert refused.user is None
        delays.append((refused.status, refused.delay))
    assert delays[0] == (401, FAILURE_DELAY) and delays[FREE_FAILURES - 2] == (401, FAILURE_DELAY)
    assert [d for _, d in delays[FREE_FAILURES - 1:]] == sorted(d for _, d in delays[FREE_FAILURES - 1:])
    assert delays[FREE_FAILURES - 1][0] == 429 and delays[-1] == (429, MAX_DELAY)
    # The right credential is accepted at once all the same, and clears the count.
    assert authenticate(store, throttle, token, "dr.ana", now).user.name == "dr.ana"
    assert throttle.failures("dr.ana", now) == 0
    # Counts are per claimed name; a credential pasted as a name is never used as one.
    assert throttle.failures("dr.bo", now) == 0
    pasted = authenticate(store, throttle, "wrong", token, now)
    assert token not in pasted.message and throttle.failures(NOT_A_NAME, now) == 1
    # Failures are forgotten after a quiet while.
    throttle.fail("dr.bo", now)
    assert throttle.failures("dr.bo", now + FORGET_AFTER + 1) == 0
    # A credential that belongs to someone else than the name given is refused.
    assert authenticate(store, throttle, other, "dr.ana", now).reason == "wrong_user"
    assert authenticate(store, throttle, None, None, now).reason == "missing_credential"
    assert delay_for(100) == MAX_DELAY


def test_a_role_includes_another_only_if_it_may_do_all_it_may():
    roles = load_roles(None, CATALOGUE)
    admin, clinician, clerk, patient = (roles.get(n) for n in ("admin", "clinician", "clerk", "patient"))
    assert admin.includes(clinician) and admin.includes(patient)
    assert clinician.includes(clerk) and not clerk.includes(clinician) and not clinician.includes(admin)
    assert not clinician.includes(patient)  # a clinician does not read disclosures


def test_listing_what_every_user_may_do_does_not_make_a_role_harder_to_hand_out(tmp_path):
    path = tmp_path / "roles.toml"
    path.write_text("[roles.admin]\nallow = ['*']\n[roles.desk]\nallow = ['users.add', 'status']\n"
                    "[roles.viewer]\nallow = ['status', 'users.whoami']\n")
    roles = load_roles(path, CATALOGUE)
    assert roles.get("desk").includes(roles.get("viewer"))
