"""The access policy file, the sealed answer and the pull messages, without a network."""

import pytest

from ehrnode import crypto
from ehrnode.errors import CodecError, ConfigError, CryptoError
from ehrnode.ledger.consent import Decision
from ehrnode.sharing.messages import PART_BYTES, PullAnswer, PullRequest, split_served
from ehrnode.sharing.policy import load_policy


def consent(allowed, reason="granted"):
    return lambda default: Decision(allowed if reason != "default" else default, reason,
                                    None if reason == "default" else b"t" * 32)


def test_the_packaged_policy_decides_policy_then_consent_then_emergency():
    policy = load_policy()
    assert policy.decide("B", "institution", "clinician", "treatment", "Condition", consent(True)).reason == "granted"
    # The regulator reads logs, not records.
    assert policy.decide("R", "regulator", "clinician", "treatment", "Condition", consent(True)).reason == "policy"
    # Research: only listed types, and only with consent (not in default_allow).
    assert policy.decide("B", "institution", "clinician", "research", "Patient", consent(True)).reason == "policy"
    assert policy.decide("B", "institution", "clinician", "research", "Condition",
                         consent(None, "default")).reason == "consent"
    assert policy.decide("B", "institution", "clinician", "treatment", "Condition", consent(None, "default")).granted
    # Emergency overrides a missing consent, not an explicit revocation.
    emergency = policy.decide("B", "institution", "clinician", "emergency", "Condition", consent(None, "default"))
    assert (emergency.granted, emergency.reason) == (True, "emergency_override")
    revoked = policy.decide("B", "institution", "clinician", "emergency", "Condition", consent(False, "revoked"))
    assert (revoked.granted, revoked.reason, revoked.consent) == (False, "consent", b"t" * 32)


def test_break_the_glass_and_named_requesters(tmp_path):
    path = tmp_path / "access.toml"
    path.write_text('[consent]\ndefault_allow = []\nemergency_override = "revoked"\n'
                    '[[allow]]\nrequesters = ["B"]\npurposes = ["*"]\nresource_types = ["Condition"]\n')
    policy = load_policy(path)
    assert policy.decide("B", "institution", "clinician", "emergency", "Condition", consent(False, "revoked")).granted
    assert policy.decide("C", "institution", "clinician", "emergency", "Condition", consent(True)).reason == "policy"
    assert policy.decide("B", "institution", "clinician", "treatment", "Condition",
                         consent(None, "default")).reason == "consent"


def test_rules_can_name_the_requesting_users_role():
    policy = load_policy()
    # The packaged policy: care for clinicians (and admins), research for researchers too; a clerk pulls nothing.
    assert policy.decide("B", "institution", "clinician", "treatment", "Condition", consent(True)).granted
    assert policy.decide("B", "institution", "clerk", "treatment", "Condition", consent(True)).reason == "policy"
    assert policy.decide("B", "institution", "researcher", "treatment", "Condition", consent(True)).reason == "policy"
    assert policy.decide("B", "institution", "researcher", "research", "Condition", consent(True)).granted


@pytest.mark.parametrize("text,needle", [
    ("[[allow]]\nrequesters = ['*']\npurposes = ['*']\nresource_types = ['*']\nusers = ['Dr Who']\n", "Dr Who"),
    ("[[allow]]\nrequesters = ['*']\npurposes = ['*']\nresource_types = ['*']\nusers = 'clinician'\n", "users"),
    ("[[allow]]\nrequesters = ['role:doctor']\npurposes = ['*']\nresource_types = ['*']\n", "role:doctor"),
    ("[[allow]]\nrequesters = ['*']\npurposes = ['fun']\nresource_types = ['*']\n", "fun"),
    ("[[allow]]\nrequesters = ['*']\npurposes = ['*']\nresource_types = ['lab results']\n", "lab results"),
    ("[[allow]]\nrequesters = ['*']\npurposes = ['*']\n", "needs requesters"),
    ("[consent]\nemergency_override = 'always'\n", "always"),
    ("[consent]\ndefault_allow = ['everything']\n", "everything"),
    ("[requests]\nmax_age_seconds = 0\n", "max_age_seconds"),
    ("[requests]\nmax_age = 5\n", "max_age"),
    ("[alow]\n", "alow"),
    ("not toml [", "TOML"),
])
def test_a_bad_policy_file_names_the_problem(tmp_path, text, needle):
    path = tmp_path / "access.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_policy(path)
    assert needle in str(error.value) and str(path) in str(error.value)


def test_a_missing_policy_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        load_policy(tmp_path / "absent.toml")


def test_sealed_answers_open_only_for_their_key_and_request():
    key, other = crypto.SealingKey.generate(), crypto.SealingKey.generate()
    sealed = crypto.seal_to(key.public_key, b"release", b"request-1")
    assert key.open(sealed, b"request-1") == b"release"
    for opener, context in ((other, b"request-1"), (key, b"request-2")):
        with pytest.raises(CryptoError):
            opener.open(sealed, context)
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(CryptoError):
        key.open(bytes(flipped), b"request-1")
    with pytest.raises(CryptoError):
        key.open(b"short", b"request-1")


def test_requests_verify_only_under_the_signers_key_and_decode_strictly():
    me, someone = crypto.Identity.generate(), crypto.Identity.generate()
    request = PullRequest.create(chain_id="c", requester="B", user=b"u" * 15, role="clinician", owner="A",
                                 record=b"r" * 16, purpose="treatment", time_ms=5, identity=me)
    decoded = PullRequest.decode(request.encode())
    assert decoded == request and decoded.signature_ok(me.public_key)
    assert not decoded.signature_ok(someone.public_key)
    for bad in (b"", b"\x00" * 2000, request.encode()[:-1], request.encode() + b"\x00"):
        with pytest.raises(CodecError):
            PullRequest.decode(bad)


def test_large_releases_travel_in_parts():
    sealed = bytes(PART_BYTES * 2 + 10)
    parts = split_served(b"q" * 32, sealed, b"a" * 32)
    assert [p.part for p in parts] == [0, 1, 2] and {p.parts for p in parts} == {3}
    assert b"".join(PullAnswer.decode(p.encode()).data for p in parts) == sealed
