"""The method table: every method of the local API, declared once.

Each entry names the method, its handler, what it takes and answers (the line the API
reference shows), and who may call it: the method's name is the permission a role grants
(``records.add``, or its group ``records.*``); ``patient`` marks the methods that name one
patient by EMPI, the only ones a patient-role user may be allowed; ``always`` the ones every
user may call. The server routes by this table, the roles file is checked against it, the
CLI lists it (``ehrnode api methods``) and ``docs/api.md`` is generated from it
(:func:`reference`; a test keeps the two in step). Adding a method is one entry here and
its handler.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..users.roles import Catalogue
from . import chain, consent, empi, records, sharing, users
from .call import Handler


@dataclass(frozen=True)
class Method:
    name: str
    handler: Handler
    #: ``params -> result``, as the API reference shows it.
    summary: str
    #: Names one patient by EMPI: a patient-role user may be allowed it (for their own EMPI only).
    patient: bool = False
    #: Every user may call it, whatever their role.
    always: bool = False
    #: Only for institutions (a regulator's node answers ``not_recording``).
    institution: bool = False

    @property
    def group(self) -> str:
        return self.name.partition(".")[0]

    @property
    def flags(self) -> tuple[str, ...]:
        """Who may call it, as the reference marks it: ``patient``, ``institution``."""
        return tuple(f for f, on in (("patient", self.patient), ("institution", self.institution)) if on)


TABLE: tuple[Method, ...] = (
    # The chain.
    Method("status", chain.status, '-> `{"node", "height", "head", "round", "peers", "mempool", ...}`'),
    Method("block.get", chain.block_get,
           '`{"height", "ids"}` (default: the head) -> `{"height", "id", "parent", "round", "time", "epoch", '
           '"author", "txs"}`; with `"ids": true` each of `txs` is only `{"id", "status"}`, read from the ledger '
           'without opening the envelopes'),
    Method("blocks.subscribe", chain.blocks_subscribe, "then one `block.committed` notification per committed block"),
    Method("tx.submit", chain.tx_submit, '`{"note", "wait", "timeout"}` -> `{"tx_id", "height"}` (a test note)'),
    Method("tx.submit_batch", chain.tx_submit_batch, '`{"notes": [...]}` -> `{"tx_ids", "errors": [{"index", '
                                                     '"reason"}]}`'),
    Method("tx.get", chain.tx_get, '`{"tx_id"}` -> `{"tx_id", "height" (null until committed), "pending"}`'),
    Method("txs.wait", chain.txs_wait, '`{"tx_ids": [...], "timeout"}` -> `{"heights": {TX: height or null}}`'),
    Method("keys.status", chain.keys_status, "-> the epochs, who opened each, whom its key was sealed to, which keys "
                                             "this member holds (and why not, under `unreadable`)"),
    Method("keys.rotate", chain.keys_rotate, '-> `{"tx_id", "height", "epoch", "starts"}`: the next epoch, now'),
    Method("consortium.members", chain.consortium_members,
           '-> `{"epoch", "starts", "quorum", "running_epoch", "members": [...]}`'),
    Method("consortium.proposals", chain.consortium_proposals,
           '`{"status": open|adopted|lapsed}` -> proposals, their voters and the votes needed'),
    Method("consortium.propose", chain.consortium_propose,
           '`{"change": add|remove|rotate-key, "name", "reason"}`, and for add and rotate-key `"signing_key", '
           '"sealing_key"` (hex), `"address"`, `"role"` (add) -> `{"tx_id", "height", "status", "proposal"}`'),
    Method("consortium.vote", chain.consortium_vote, '`{"proposal"}` -> the same; `proposal.status` says whether '
                                                     'it was adopted'),
    # Records.
    Method("records.stage", records.records_stage,
           '`{"items": [{"source", "resource"}]}` -> `{"staged"}`: holds FHIR resources on this connection, so '
           'an input larger than one message is still recorded at once by the next `records.add` (each part is '
           'validated while the next is sent, and the OPRF evaluations its Patients\' EMPI enrolments need are '
           'asked for, as the caller; problems are reported by `records.add`)',
           institution=True),
    Method("records.add", records.records_add,
           '`{"items" (optional), "skip_invalid", "wait", "timeout"}` -> `{"records": [{"record_id", "patient", '
           '"empi", "resource_type", "source", "position", "tx_id", "status"}], "skipped": [...]}`; with `wait`, '
           'once the anchors are committed (each record with its `height`, null if not in time); invalid input '
           'without `skip_invalid` records nothing (`invalid_input`)', institution=True),
    Method("records.list", records.records_list, '`{"empi"}` -> the committed anchors of that patient, '
                                                 'consortium-wide', patient=True),
    Method("records.show", records.records_show, '`{"record_id"}` -> this institution\'s record, raw and released',
           institution=True),
    Method("records.kanon", records.records_kanon, "-> the k-anonymity reached by the released patients",
           institution=True),
    Method("records.erase", records.records_erase, '`{"record_id", "reason"}` (owner) -> `{"tx_id", "height", '
                                                   '"status"}`', institution=True),
    Method("vault.verify", records.vault_verify, '`{"decrypt"}` -> `{"ok", "entries", "problems", ...}`',
           institution=True),
    # Sharing and audit.
    Method("records.pull", sharing.records_pull,
           '`{"record_id", "purpose", "timeout"}` -> the verified release `{"record_id", "owner", "purpose", '
           '"resource", "salt", "commitment", "access_tx", "height", "emergency", "verified"}`; a refusal names '
           "the owner's reason and access log"),
    Method("audit.trail", sharing.audit_trail,
           '`{"empi"}`, `{"record_id"}` or `{"user": "INSTITUTION/PSEUDONYM"}`, `"fhir"` -> events in chain order '
           "(or a FHIR Bundle of AuditEvents)", patient=True),
    Method("audit.disclosures", sharing.audit_disclosures, '`{"empi"}` -> every access granted to the patient\'s '
                                                           'records', patient=True),
    Method("audit.trace", sharing.audit_trace, '`{"leaked": {"resource", "salt"}}` -> the record and everyone it '
                                               'was served to'),
    Method("audit.whois", sharing.audit_whois,
           '`{"pseudonym"}` -> the user of this institution behind it; with `"at", "case"`, asks that institution '
           "on chain and opens its sealed answer"),
    Method("events.subscribe", sharing.events_subscribe, '`{"empis", "own"}` then one `event` notification per '
                                                         'event'),
    # EMPI.
    Method("empi.of", empi.empi_of, '`{"patients": [ENROLMENT]}` -> `{ENROLMENT: EMPI or null}` (this node\'s '
                                    'own enrolment ids, as `records.add` returns them)'),
    Method("empi.lookup", empi.empi_lookup, '`{"patient": FHIR Patient}` -> `{"empi", "grade", "candidates"}`',
           institution=True),
    Method("empi.review", empi.empi_review, "-> the potential-duplicate queue with field-level evidence"),
    Method("empi.history", empi.empi_history, '`{"empi"}` -> every change to that EMPI'),
    Method("empi.requests", empi.empi_requests, "-> held links and merges made by this member or waiting for it"),
    Method("empi.link", empi.empi_link, '`{"enrolment", "empi"}` -> `{"tx_id", "height", "status"}`, and '
                                        '`"waiting": [MEMBER]` while other institutions must agree'),
    Method("empi.split", empi.empi_split, '`{"enrolment"}` -> `{"tx_id", "height", "status"}`'),
    Method("empi.not_duplicate", empi.empi_not_duplicate, '`{"a", "b"}` -> `{"tx_id", "height", "status"}`'),
    Method("empi.merge", empi.empi_merge, '`{"from", "into"}` -> `{"tx_id", "height", "status"}`, and `"waiting"` '
                                          'while other institutions must agree'),
    Method("empi.unmerge", empi.empi_unmerge, '`{"merge": TX}` -> `{"tx_id", "height", "status"}`'),
    Method("empi.accept", empi.empi_accept, '`{"request": TX}`: agree to another institution\'s held link or merge'),
    # Consent.
    Method("consent.grant", consent.consent_change,
           '`{"empi", "to": MEMBER or "*", "purposes", "scope", "until"}` -> `{"tx_id", "height", "status"}`',
           patient=True),
    Method("consent.revoke", consent.consent_change, "as `consent.grant`", patient=True),
    Method("consent.show", consent.consent_show, '`{"empi"}` -> every grant and revocation, in chain order',
           patient=True),
    # Users.
    Method("users.whoami", users.users_whoami, "-> the caller's name, role, pseudonym and permissions", always=True),
    Method("users.list", users.users_list, "-> every user (revoked ones too), without credentials"),
    Method("users.add", users.users_add, '`{"name", "role", "empi" (patient roles)}` -> the user and its '
                                         '`credential` (shown once)'),
    Method("users.rotate", users.users_rotate, '`{"name"}` -> a new `credential`; the old one stops working at once'),
    Method("users.revoke", users.users_revoke, '`{"name"}` -> the user, revoked; their connections are closed'),
)

BY_NAME: dict[str, Method] = {m.name: m for m in TABLE}
NAMES = frozenset(BY_NAME)
#: What a roles file may name (:mod:`ehrnode.users.roles`).
ALWAYS = frozenset(m.name for m in TABLE if m.always)
CATALOGUE = Catalogue(methods=NAMES, patient=frozenset(m.name for m in TABLE if m.patient), always=ALWAYS)

assert len(BY_NAME) == len(TABLE), "a method declared twice"

_GROUPS = {"status": "The chain", "block": "The chain", "blocks": "The chain", "tx": "The chain", "txs": "The chain",
           "keys": "Keys and membership", "consortium": "Keys and membership", "records": "Records",
           "vault": "Records", "audit": "Sharing and audit", "events": "Sharing and audit", "empi": "EMPI",
           "consent": "Consent", "users": "Users"}


def reference() -> str:
    """The API reference (``docs/api.md``), from the table."""
    lines = [
        "# The local API",
        "",
        "JSON-RPC 2.0 over a websocket on the node's `[api] listen` address (see docs/operations.md for",
        "authentication). Generated from `ehrnode/api/methods.py` by `ehrnode api methods --markdown`;",
        "do not edit by hand. *patient*: a patient-role user may be allowed it, for their own EMPI;",
        "*institution*: an institution's node only; every user may call `users.whoami`.",
        "",
    ]
    groups: dict[str, list[Method]] = {}
    for method in TABLE:
        groups.setdefault(_GROUPS.get(method.group, method.group), []).append(method)
    for title, methods in groups.items():
        lines += [f"## {title}", "", "| method | takes -> answers | |", "|---|---|---|"]
        for m in methods:
            lines.append(f"| `{m.name}` | {m.summary.replace('|', '&#124;')} | {', '.join(m.flags)} |")
        lines.append("")
    return "\n".join(lines)
