"""The ``ehrnode`` command.

Each subcommand is a function taking parsed arguments and returning an exit
code. Errors ehrnode raises on purpose become one line on stderr and exit 2;
``--json`` output is one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import EhrnodeError, innermost

T = TypeVar("T")

if TYPE_CHECKING:
    from .api import ApiServer
    from .node import Node
    from .sim import ScenarioResult


class UsageError(EhrnodeError):
    """A command-line argument that cannot be used."""

    reason = "usage"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _run_one(work: tuple[int, int, int | None]) -> ScenarioResult:
    from .sim import run_scenario, scenario_configs

    seed, validators, byzantine = work
    return run_scenario(seed, scenario_configs(validators, byzantine))


def _print_failure(result: ScenarioResult, replay: str) -> None:
    print(f"FAIL seed={result.seed} byzantine={result.byzantine}")
    for line in result.safety_violations:
        print(f"  safety: {line}")
    if result.liveness_failure:
        print(f"  liveness: {result.liveness_failure}")
    for fault in result.faults:
        print(f"  fault: {fault}")
    print(f"  replay: {replay}")


def cmd_sim(args: argparse.Namespace) -> int:
    from .sim import replay_command, scenario_configs

    f = (args.validators - 1) // 3
    if args.byzantine is not None and args.byzantine > f:
        raise UsageError(f"--byzantine {args.byzantine} exceeds f={f} for {args.validators} validators")
    config = scenario_configs(args.validators, args.byzantine)
    work = [(seed, args.validators, args.byzantine) for seed in range(args.seed, args.seed + args.scenarios)]
    jobs = min(args.jobs or os.cpu_count() or 1, len(work))
    violations = liveness = commits = epochs = changes = 0
    failures: list[ScenarioResult] = []
    with ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else nullcontext() as pool:
        results = pool.map(_run_one, work, chunksize=4) if pool else map(_run_one, work)
        for result in results:
            commits += result.commits
            epochs += result.epochs
            changes += result.membership_changes
            violations += len(result.safety_violations)
            liveness += result.liveness_failure is not None
            if not result.ok:
                failures.append(result)
                if not args.json:
                    _print_failure(result, replay_command(result.seed, config))
    summary: dict[str, object] = {
        "scenarios": args.scenarios, "safety_violations": violations, "liveness_failures": liveness, "commits": commits,
        "epoch_changes": epochs, "membership_changes": changes,
    }
    if args.json:
        summary["failures"] = [
            {"seed": r.seed, "byzantine": {str(k): v for k, v in r.byzantine.items()}, "safety": r.safety_violations,
             "liveness": r.liveness_failure, "faults": r.faults, "replay": replay_command(r.seed, config)}
            for r in failures
        ]
        print(json.dumps(summary))
    else:
        print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 1 if violations or liveness else 0


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def cmd_consortium_init(args: argparse.Namespace) -> int:
    from .consortium import CERTS_DIR, found_consortium, init_consortium

    if args.members:
        if args.institutions or args.regulator:
            raise UsageError("--members founds from the members' own public halves: leave out --institutions and "
                             "--regulator")
        genesis = found_consortium(args.dir, args.members, tls=not args.no_tls)
        if args.json:
            print(json.dumps({"chain_id": genesis.chain_id, "genesis_hash": genesis.hash.hex(),
                              "genesis": str(args.dir / "genesis.toml"),
                              "members": [{"name": m.name, "role": m.role, "address": str(m.address)}
                                          for m in genesis.members]}))
            return 0
        print(f"consortium {genesis.chain_id}: {args.dir / 'genesis.toml'} (genesis {genesis.hash.hex()[:16]})")
        for m in genesis.members:
            print(f"  {m.name:<16} {m.role:<12} peer {m.address}")
        certificates = f", ca/ca.pem and {CERTS_DIR}/<its name>.pem (as keys/tls.pem)"
        files = "genesis.toml" + ("" if args.no_tls else certificates)
        print(f"send each member {files}; no member's private key is here"
              + ("" if args.no_tls else f"; keep {args.dir / 'ca' / 'ca.key'} offline"))
        return 0
    if not args.institutions or not args.regulator:
        raise UsageError("name the members: --members FILE... (their `keys init` public halves), or, for a "
                         "consortium kept on one machine, --institutions A,B,... --regulator R")
    genesis = init_consortium(
        args.dir, args.institutions, args.regulator, host=args.host, base_port=args.base_port, hosts=args.hosts,
        tls=not args.no_tls,
    )
    if args.json:
        print(json.dumps({
            "chain_id": genesis.chain_id, "genesis_hash": genesis.hash.hex(),
            "members": [{"name": m.name, "role": m.role, "address": str(m.address),
                         "config": str(args.dir / m.name / "node.toml")} for m in genesis.members],
        }))
    else:
        print(f"consortium {genesis.chain_id} in {args.dir} (genesis {genesis.hash.hex()[:16]})")
        for m in genesis.members:
            print(f"  {m.name:<16} {m.role:<12} peer {m.address}  config {args.dir / m.name / 'node.toml'}")
    print(f"ehrnode: every member's private keys were made here, in {args.dir}: for a demo, tests or a test bed. "
          "A real consortium is founded with `keys init` at each member and `consortium init --members`.",
          file=sys.stderr)
    return 0


def cmd_deid_check(args: argparse.Namespace) -> int:
    """What a profile would release from FILE..., and what it removed or changed (nothing recorded)."""
    from .records import fhir
    from .records.deid import Deidentifier, load_profile
    from .records.deid.check import check, summary
    from .records.submit import read_inputs

    profile_name: Path | str | None = args.profile
    key = os.urandom(32)
    if args.config or os.environ.get("EHRNODE_CONFIG"):
        from .config import load_node_config
        from .records.keys import _derive, load_secret

        config = load_node_config(_config_path(args))
        if profile_name is None:
            profile_name = config.deid_profile_path
        if config.master_key_path is not None:
            # The institution's own key: pseudonyms and date shifts as its releases have them.
            key = _derive(load_secret(config.master_key_path, "master key"), "deid")
    if isinstance(profile_name, str) and ("/" in profile_name or profile_name.endswith(".toml")):
        profile_name = Path(profile_name)
    deid = Deidentifier(load_profile(profile_name), key)
    inputs = read_inputs(args.files, skip_invalid=True)
    items = [item for item in inputs.items if fhir.validate(item) is None]
    invalid = len(inputs.items) - len(items) + len(inputs.problems)
    results = check(items, deid, level=args.level)
    totals = summary(results)
    totals["invalid_input"] = invalid
    totals["profile"] = deid.profile.name
    if args.json:
        print(json.dumps({"summary": totals, "resources": [r.view(with_release=not args.summary) for r in results]},
                         ensure_ascii=False))
        return 0
    if not args.summary:
        for r in results:
            print(f"== {r.source} {r.resource_type}/{r.resource_id}")
            if r.error:
                print(f"   not releasable: {r.error}")
                continue
            print(json.dumps(r.released, ensure_ascii=False))
            for what, paths in (("removed", r.removed), ("changed", r.changed), ("added", r.added)):
                if paths:
                    print(f"   {what}: {', '.join(paths)}")
            if r.found:
                print(f"   found in text: {', '.join(f'{k} {n}' for k, n in r.found.most_common())}")
    print(f"profile {totals['profile']}: {totals['resources']} resources, {totals['unreleasable']} not releasable, "
          f"{invalid} invalid input")
    for what in ("removed", "changed", "added"):
        if totals[what]:
            print(f"{what}:")
            for path, count in totals[what].items():
                print(f"  {count:>7}  {path}")
    if totals["found_in_text"]:
        print("found in free text: " + ", ".join(f"{k} {n}" for k, n in totals["found_in_text"].items()))
    return 0


def cmd_api_methods(args: argparse.Namespace) -> int:
    """Every method of the local API, from its method table."""
    from .api.methods import TABLE, reference

    if args.markdown:
        print(reference())
    elif args.json:
        print(json.dumps([{"method": m.name, "summary": m.summary, "patient": m.patient, "always": m.always,
                           "institution": m.institution} for m in TABLE]))
    else:
        width = max(len(m.name) for m in TABLE)
        for m in TABLE:
            flags = "".join(f" [{f}]" for f, on in (("patient", m.patient), ("institution", m.institution)) if on)
            print(f"{m.name:<{width}}  {m.summary}{flags}")
    return 0


def cmd_keys_init(args: argparse.Namespace) -> int:
    from .config import Address
    from .consortium import MEMBER_FILE, keys_init

    config, member = keys_init(args.out, args.name, args.role, Address.parse(args.address, "--address"),
                               tls=not args.no_tls)
    public = {k: v for k, v in member.items() if k != "tls_request"}
    if args.json:
        print(json.dumps({**public, "config": str(config.path), "member_file": str(args.out / MEMBER_FILE)}))
        return 0
    print(json.dumps(public, indent=2))
    print(f"keys in {args.out / 'keys'} (0600; master.key never leaves this institution); node configuration "
          f"{config.path}; send {args.out / MEMBER_FILE} (public: keys, address"
          f"{'' if args.no_tls else ', TLS certificate request'}) to the founder", file=sys.stderr)
    return 0


def _config_path(args: argparse.Namespace) -> Path:
    path = args.config or os.environ.get("EHRNODE_CONFIG")
    if not path:
        raise UsageError("no node configuration: pass --config PATH or set EHRNODE_CONFIG")
    return Path(path)


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from . import logs
    from .api import CATALOGUE, ApiServer
    from .config import load_node_config
    from .node import Node
    from .users.roles import load_roles

    config = load_node_config(_config_path(args))
    logs.configure(config.log_level)
    roles = load_roles(config.roles_path, CATALOGUE)  # a bad roles file stops the node before it starts
    node = Node(config)
    try:
        trio.run(_serve_until_signalled, node, ApiServer(node, roles))
    except BaseException as group:
        exc = innermost(group)
        if isinstance(exc, OSError):
            raise UsageError(f"cannot listen: {exc.strerror or exc}") from group
        if isinstance(exc, EhrnodeError) and exc is not group:
            raise exc from group
        raise
    finally:
        node.close()
    return 0


async def _serve_until_signalled(node: Node, api: ApiServer) -> None:
    import signal
    from functools import partial

    import trio

    listen = node.config.api_listen
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(node.run, listeners=[partial(api.serve, listen.host, listen.port)]))
            async for signum in signals:
                node.log.info("node.stopping", signal=signal.Signals(signum).name)
                break
            # Peers first (closed with 1001, no new ones), then every task; the stores are
            # closed only once nothing can write to them any more (cmd_run's finally).
            await node.shutdown()
            nursery.cancel_scope.cancel()


def _run_client(args: argparse.Namespace, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(client)`` against the node of ``--config``."""
    import trio

    from .client import ApiClient
    from .config import load_node_config

    config = load_node_config(_config_path(args))
    user, credential = _credential(args)

    async def go() -> T:
        async with ApiClient.connect(config, user=user, credential=credential) as client:
            return await work(client)

    return trio.run(go)


def _credential(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The user to act as and their credential (None, None: the node's own admin, from api.token)."""
    user = getattr(args, "user", None) or os.environ.get("EHRNODE_USER") or None
    path = getattr(args, "credential", None) or os.environ.get("EHRNODE_CREDENTIAL") or None
    if path is None:
        return user, None
    try:
        credential = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the credential file {path}: {exc}") from exc
    if not credential:
        raise UsageError(f"the credential file {path} is empty")
    return user, credential


def _call(args: argparse.Namespace, method: str, **params: object) -> object:
    return _run_client(args, lambda client: client.call(method, **params))


def cmd_status(args: argparse.Namespace) -> int:
    status = _call(args, "status")
    assert isinstance(status, dict)
    if args.json:
        print(json.dumps(status))
    else:
        print(f"node {status['node']}  height {status['height']}  round {status['round']}  "
              f"mempool {status['mempool']}")
        print(f"head {status['head']}")
        print(f"peers {', '.join(status['peers']) or '(none)'}")
    return 0


def cmd_keys_status(args: argparse.Namespace) -> int:
    view = _call(args, "keys.status")
    assert isinstance(view, dict)
    if args.json:
        print(json.dumps(view))
        return 0
    print(f"current epoch {view['current']}  (rotated every {view['rotate_days']:g} days, in turn)")
    for e in view["epochs"]:
        opened = datetime.datetime.fromtimestamp(e["time"] / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        held = "held" if e["held"] else "NOT HELD"
        print(f"  epoch {e['epoch']:<4} from height {e['starts']:<8} {opened}Z  by {e['opened_by']:<12} {held}")
    for epoch, why in view["unreadable"].items():
        print(f"  epoch {epoch}: {why}", file=sys.stderr)
    return 1 if view["unreadable"] else 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    result = _call(args, "keys.rotate", timeout=args.timeout)
    assert isinstance(result, dict)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"epoch {result['epoch']} opened at height {result['height']}: blocks from height "
              f"{result['starts']} are sealed under its key")
    return 0


def cmd_block_get(args: argparse.Namespace) -> int:
    params = {} if args.height is None else {"height": args.height}
    block = _call(args, "block.get", **params)
    assert isinstance(block, dict)
    if args.json:
        print(json.dumps(block))
    else:
        print(f"height {block['height']}  round {block['round']}  author {block.get('author')}")
        print(f"id     {block['id']}")
        print(f"parent {block['parent']}")
        for tx in block["txs"]:
            print(f"  {tx['id'][:16]}  {tx['kind']:<8} {tx.get('submitter', '')}  {json.dumps(tx.get('body', {}))}")
    return 0


def cmd_tx_submit(args: argparse.Namespace) -> int:
    result = _call(args, "tx.submit", note=args.note, wait=args.wait, timeout=args.timeout)
    assert isinstance(result, dict)
    if args.json:
        print(json.dumps(result))
    elif result["height"] is None:
        print(f"submitted {result['tx_id']}")
    else:
        print(f"committed {result['tx_id']} at height {result['height']}")
    return 0


def cmd_records_add(args: argparse.Namespace) -> int:
    from .records.submit import add_items, read_inputs

    inputs = read_inputs(args.files, skip_invalid=args.skip_invalid)
    items, problems = inputs.items, inputs.problems
    for path in inputs.empty:
        print(f"empty: {path}: no resources in it (nothing to record)", file=sys.stderr)
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    if not items:
        raise UsageError("no resources to record")

    def progress(text: str) -> None:
        if not args.json:
            print(f"... {text}", file=sys.stderr)

    result = _run_client(args, lambda client: add_items(
        client, items, skip_invalid=args.skip_invalid, wait=not args.no_wait, timeout=args.timeout,
        progress=progress))
    rows = [{"record_id": r["record_id"], "empi": r["empi"], "tx_id": r["tx_id"],
             "height": result.heights.get(r["tx_id"]) if r["tx_id"] else None,
             "resource_type": r["resource_type"], "source": r["source"], "status": r["status"],
             "patient": r["patient"]}
            for r in result.records]
    for skip in result.skipped:
        print(f"skipped: {skip['source']} {skip['resource_type']}/{skip['id']}: {skip['reason']}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            where = "pending" if row["height"] is None else f"height {row['height']}"
            print(f"{row['record_id']}  {row['empi']}  {row['resource_type']:<20} {row['status']:<16} "
                  f"{where:<14} {row['source']}")
        new = sum(r["status"] == "recorded" for r in rows)
        print(f"{new} recorded, {len(rows) - new} already recorded, {len(result.skipped) + len(problems)} skipped",
              file=sys.stderr)
    undecided = {r["patient"] for r in rows if r["empi"] is None and r["height"] is not None}
    if undecided:
        print(f"ehrnode: {len(undecided)} patient(s) have no EMPI yet: their enrolment is not committed "
              "(`ehrnode records list` finds their records once it is)", file=sys.stderr)
    uncommitted = [r for r in rows if r["tx_id"] and r["height"] is None]
    if uncommitted and not args.no_wait:
        print(f"ehrnode: {len(uncommitted)} anchors not committed within {args.timeout} s "
              "(they stay queued and are offered again)", file=sys.stderr)
        return 1
    return 0


def cmd_records_list(args: argparse.Namespace) -> int:
    rows = _call(args, "records.list", empi=args.empi)
    assert isinstance(rows, list)
    if args.json:
        print(json.dumps([{k: r[k] for k in ("record_id", "empi", "institution", "recorded_at", "resource_type",
                                               "commitment", "height", "setting", "tx_id")} for r in rows]))
        return 0
    if not rows:
        print(f"no records anchored for {args.empi}")
    for r in rows:
        print(f"{r['record_id']}  {r['institution']:<12} {r['resource_type']:<20} {r['setting']:<8} "
              f"height {r['height']:<8} {_iso(r['recorded_at'])}")
    return 0


def _iso(ms: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_records_show(args: argparse.Namespace) -> int:
    record = _call(args, "records.show", record_id=args.record_id)
    assert isinstance(record, dict)
    if args.json:
        print(json.dumps(record))
        return 0
    anchor = record["anchor"]
    print(f"record {record['record_id']}  {record['resource_type']}  empi {record['empi']}  "
          f"vault position {record['position']}")
    print(f"anchor {'height ' + str(anchor['height']) + ' tx ' + anchor['tx_id'] if anchor else 'not yet committed'}")
    print(json.dumps(record["deidentified" if args.deidentified else "resource"], indent=2, ensure_ascii=False))
    return 0


def cmd_records_kanon(args: argparse.Namespace) -> int:
    report = _call(args, "records.kanon")
    assert isinstance(report, dict)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:<14} {value}")
    return 0


def cmd_vault_verify(args: argparse.Namespace) -> int:
    report = _call(args, "vault.verify", decrypt=not args.no_decrypt)
    assert isinstance(report, dict)
    if args.json:
        print(json.dumps(report))
    else:
        state = "OK" if report["ok"] else f"{len(report['problems'])} PROBLEM(S)"
        print(f"vault {state}: {report['entries']} entries, {report['anchored']} anchored on chain, "
              f"{report['erased']} erased, head {report['head'][:16]}")
        for p in report["problems"]:
            print(f"  position {p['position']} record {p['record_id']}: {p['problem']}")
    return 0 if report["ok"] else 1


def _print_rows(rows: object, as_json: bool, line: object) -> None:
    assert isinstance(rows, list)
    if as_json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(line(row))  # type: ignore[operator]


def cmd_empi_lookup(args: argparse.Namespace) -> int:
    try:
        patient = json.loads(Path(args.patient).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"cannot read a FHIR Patient from {args.patient}: {exc}") from exc
    result = _call(args, "empi.lookup", patient=patient)
    assert isinstance(result, dict)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"empi {result['empi'] or '(none: a new patient)'}  grade {result['grade'] or '-'}")
        for c in result["candidates"]:
            print(f"  candidate {c['empi']}  {c['grade']:<9} score {c['evidence']['total']}")
    return 0


def cmd_empi_review(args: argparse.Namespace) -> int:
    items = _call(args, "empi.review")

    def line(item: dict) -> str:
        fields = ", ".join(f"{f['field']} {f['dice']}" for f in item["evidence"]["fields"] if f["dice"] is not None)
        return (f"{item['a']['enrolment']} ({item['a']['institution']}, {item['a']['empi']})  ~  "
                f"{item['b']['enrolment']} ({item['b']['institution']}, {item['b']['empi']})  score {item['score']}"
                f"  [{fields}]")

    _print_rows(items, args.json, line)
    if not args.json and not items:
        print("no potential duplicates")
    return 0


def cmd_empi_history(args: argparse.Namespace) -> int:
    _print_rows(_call(args, "empi.history", empi=args.empi), args.json,
                lambda e: f"height {e['height']:<8} {e['event']:<14} {e['detail']}  tx {e['tx_id'][:16]}")
    return 0


def cmd_empi_change(args: argparse.Namespace) -> int:
    params = {
        "link": lambda: {"enrolment": args.enrolment, "empi": args.empi},
        "split": lambda: {"enrolment": args.enrolment},
        "not-duplicate": lambda: {"a": args.a, "b": args.b},
        "merge": lambda: {"from": args.source, "into": args.target},
        "unmerge": lambda: {"merge": args.merge},
        "accept": lambda: {"request": args.request},
    }[args.empi_command]()
    result = _call(args, "empi." + args.empi_command.replace("-", "_"), **params)
    assert isinstance(result, dict)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"committed {result['tx_id']} at height {result['height']}")
    if result.get("waiting"):
        print(f"held until {', '.join(result['waiting'])} agree: each runs `ehrnode empi accept {result['tx_id']}`",
              file=sys.stderr)
    return 0


def cmd_empi_requests(args: argparse.Namespace) -> int:
    def line(r: dict) -> str:
        what = (f"link {r['enrolment']} -> {r['empi']}" if r["kind"] == "link"
                else f"merge {r['from']} -> {r['into']}")
        state = f"stale ({r['stale']})" if r["stale"] else f"waiting for {', '.join(r['waiting']) or '-'}"
        return f"{r['request']}  {r['requester']:<12} {what}  {state}"

    rows = _call(args, "empi.requests")
    _print_rows(rows, args.json, line)
    if not args.json and not rows:
        print("no held links or merges")
    return 0


def _until_ms(text: str | None) -> int:
    if not text:
        return 0
    import datetime

    try:
        day = datetime.date.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(f"--until {text!r}: expected a date such as 2027-06-30") from exc
    # In force through the whole of that day (UTC).
    end = datetime.datetime.combine(day + datetime.timedelta(days=1), datetime.time(), datetime.UTC)
    return int(end.timestamp() * 1000)


def cmd_consent_change(args: argparse.Namespace) -> int:
    result = _call(args, f"consent.{args.consent_command}", empi=args.empi, to=args.to,
                   purposes=args.purpose or ["*"], scope=args.scope.split(",") if args.scope else ["*"],
                   until=_until_ms(args.until))
    assert isinstance(result, dict)
    print(json.dumps(result) if args.json else
          f"{args.consent_command} committed: {result['tx_id']} at height {result['height']}")
    return 0


def cmd_consent_show(args: argparse.Namespace) -> int:
    entries = _call(args, "consent.show", empi=args.empi)
    assert isinstance(entries, list)
    if args.json:
        print(json.dumps(entries))
        return 0
    if not entries:
        print(f"no consent recorded for {args.empi}: the consortium's default applies")
    for e in entries:
        until = _iso(e["until"]) if e["until"] else "no end"
        print(f"height {e['height']:<8} {e['action']:<7} by {e['grantor']:<12} to {e['grantee']:<12} "
              f"purposes {','.join(e['purposes'])}  types {','.join(e['scope'])}  until {until}")
    return 0


def _passphrase(args: argparse.Namespace) -> str:
    if args.passphrase_file:
        try:
            return Path(args.passphrase_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--passphrase-file: cannot read {args.passphrase_file}: {exc}") from exc
    value = os.environ.get("EHRNODE_BACKUP_PASSPHRASE")
    if not value:
        raise UsageError("a backup passphrase is needed: --passphrase-file FILE or $EHRNODE_BACKUP_PASSPHRASE")
    return value


def cmd_backup(args: argparse.Namespace) -> int:
    from .backup import create_backup
    from .config import load_node_config

    manifest = create_backup(load_node_config(_config_path(args)), Path(args.out), _passphrase(args))
    if args.json:
        print(json.dumps(manifest))
    else:
        heights = ", ".join(f"{k} {v}" for k, v in manifest["heights"].items())
        print(f"backup of {manifest['node']} written to {args.out} ({manifest['bytes']} bytes, encrypted): "
              f"{len(manifest['files'])} files; {heights}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from .backup import restore_backup
    from .config import load_node_config

    manifest = restore_backup(load_node_config(_config_path(args)), Path(args.file), _passphrase(args))
    if args.json:
        print(json.dumps(manifest))
    else:
        print(f"{manifest['node']} restored from the backup of {_iso(manifest['created'])} "
              f"({', '.join(f'{k} {v}' for k, v in manifest['heights'].items())}). Start the node: it asks the "
              "other validators how far the chain got before it signs anything, and catches up from them. "
              "Records written after the backup are not in it.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dir)


def build_parser() -> argparse.ArgumentParser:
    from .ledger.transactions import CONSENT_PURPOSES

    parser = argparse.ArgumentParser(prog="ehrnode", description="Consortium-chain node for sharing patient records.")
    commands = parser.add_subparsers(dest="command", required=True)

    consortium = commands.add_parser(
        "consortium", help="set up a consortium, and govern its membership").add_subparsers(
        dest="consortium_command", required=True)
    init = consortium.add_parser(
        "init", help="found a consortium: genesis.toml from the members' public halves (or, for tests and "
                     "demos, every member's keys and node.toml in one place)",
        description="With --members: the genesis from each member's member.json (`ehrnode keys init` at each "
        "member), the epoch 0 key and the EMPI key sealed to each member, and with TLS (the default) the "
        "consortium CA and each member's certificate from its request; no private key of a member is ever "
        "here. With --institutions and --regulator: every member's keys (0600), genesis.toml and node.toml in "
        "one directory, for a demo, tests or a test bed. Refuses to overwrite existing files.",
    )
    init.add_argument("dir", type=Path, help="directory to create the consortium in")
    init.add_argument("--members", type=Path, nargs="+", metavar="MEMBER.json",
                      help="the members' public halves, from `ehrnode keys init`")
    init.add_argument("--institutions", type=_names, help="comma-separated institution names (all in one place)")
    init.add_argument("--regulator", help="the regulator's name (all in one place)")
    init.add_argument("--host", default="127.0.0.1", help="host in every member's peer address")
    init.add_argument("--hosts", type=_names, default=None,
                      help="one host per member (institutions, then the regulator); each listens on --base-port")
    init.add_argument("--base-port", type=_positive, default=7100,
                      help="first peer port (members take consecutive ports; API ports start 100 higher)")
    init.add_argument("--no-tls", action="store_true",
                      help="no consortium CA and no certificates: plaintext peer links and local APIs (a loopback "
                           "experiment only; by default peer links and APIs are mutually authenticated TLS 1.3)")
    init.add_argument("--tls", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for scripts
    init.add_argument("--json", action="store_true", help="print one JSON document")
    init.set_defaults(func=cmd_consortium_init)

    def with_config(p: argparse.ArgumentParser, *, offline: bool = False,
                    user_flags: tuple[str, ...] = ("--user", "--as")) -> argparse.ArgumentParser:
        p.add_argument("--config", help="node.toml (default: $EHRNODE_CONFIG)")
        if not offline:
            p.add_argument(*user_flags, dest="user", metavar="NAME",
                           help="act as this user of the node (default: $EHRNODE_USER, else the node's own "
                                "admin with api.token)")
            p.add_argument("--credential", metavar="FILE",
                           help="the user's credential file (default: $EHRNODE_CREDENTIAL)")
        return p

    run = with_config(commands.add_parser("run", help="run the node in the foreground until SIGTERM or SIGINT"),
                      offline=True)
    run.set_defaults(func=cmd_run)

    status = with_config(commands.add_parser("status", help="height, head, round, peers and mempool of a node"))
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    api_group = commands.add_parser("api", help="the local API").add_subparsers(dest="api_command", required=True)
    methods = api_group.add_parser("methods", help="every method of the local API: what it takes and answers")
    methods.add_argument("--json", action="store_true")
    methods.add_argument("--markdown", action="store_true", help="the API reference, as docs/api.md has it")
    methods.set_defaults(func=cmd_api_methods)

    deid = commands.add_parser("deid", help="de-identification: what a profile releases").add_subparsers(
        dest="deid_command", required=True)
    deid_check = deid.add_parser(
        "check", help="what a profile would release from FHIR files, and every element it removed or changed",
        description="De-identify FILE... as recording would (nothing is recorded) and print each resource as it "
        "would be released, with every element removed, changed or added and what was found in free text, then "
        "counts by element. --profile names a packaged profile (default, notes) or a file; with --config, the "
        "node's profile and its own key (pseudonyms and date shifts as its releases have them), else a random "
        "key.")
    deid_check.add_argument("files", nargs="+", type=Path, metavar="FILE|DIR")
    deid_check.add_argument("--profile", help="a packaged profile's name, or a profile file")
    deid_check.add_argument("--config", help="node.toml: use that node's profile and de-identification key")
    deid_check.add_argument("--level", type=int, default=0, choices=range(5),
                            help="k-anonymity level for Patients (0: the profile's own form; 4: suppressed)")
    deid_check.add_argument("--summary", action="store_true", help="only the counts, not each resource")
    deid_check.add_argument("--json", action="store_true")
    deid_check.set_defaults(func=cmd_deid_check)

    keys = commands.add_parser("keys", help="this member's own keys, and the consortium's epoch keys").add_subparsers(
        dest="keys_command", required=True)
    keys_init_ = keys.add_parser(
        "init", help="this member's own keys, node.toml and public half (member.json), made on its own machine",
        description="Create this member's signing, sealing and records keys (0600) and, unless --no-tls, its TLS "
        "key and certificate request, in OUT/keys; OUT/node.toml; and OUT/member.json, the public half to send to "
        "the founder (`consortium init --members`) or, to join later, to a current member "
        "(`consortium propose add --member-file`). Prints the public half only.")
    keys_init_.add_argument("--name", required=True)
    keys_init_.add_argument("--role", choices=("institution", "regulator"), default="institution")
    keys_init_.add_argument("--address", required=True, metavar="HOST:PORT",
                            help="where the other members reach this node's peer port")
    keys_init_.add_argument("--out", type=Path, required=True, help="directory for the keys and node.toml")
    keys_init_.add_argument("--no-tls", action="store_true", help="no TLS key or certificate request")
    keys_init_.add_argument("--json", action="store_true")
    keys_init_.set_defaults(func=cmd_keys_init)
    keys_status = with_config(keys.add_parser("status", help="the chain's epochs and which keys this member holds"))
    keys_status.add_argument("--json", action="store_true")
    keys_status.set_defaults(func=cmd_keys_status)
    rotate = with_config(keys.add_parser(
        "rotate", help="open a new epoch now: a fresh key sealed to every current member",
        description="Generate the next epoch key, seal it to every current member's X25519 key and commit it. "
        "Transactions submitted after the block it commits in are sealed under it; earlier epochs' keys stay "
        "with current members for reading history."))
    rotate.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the commit")
    rotate.add_argument("--json", action="store_true")
    rotate.set_defaults(func=cmd_keys_rotate)

    block = commands.add_parser("block", help="committed blocks").add_subparsers(dest="block_command", required=True)
    get = with_config(block.add_parser("get", help="a committed block (default: the head)"))
    get.add_argument("--height", type=_non_negative)
    get.add_argument("--json", action="store_true")
    get.set_defaults(func=cmd_block_get)

    tx = commands.add_parser("tx", help="transactions").add_subparsers(dest="tx_command", required=True)
    submit = with_config(tx.add_parser("submit", help="submit a signed note transaction"))
    submit.add_argument("--note", required=True, help="the note's text")
    submit.add_argument("--wait", action="store_true", help="wait until it is committed and print its height")
    submit.add_argument("--timeout", type=float, default=30.0, help="seconds to wait with --wait")
    submit.add_argument("--json", action="store_true")
    submit.set_defaults(func=cmd_tx_submit)

    records = commands.add_parser("records", help="patient records: add, list, show, pull, erase").add_subparsers(
        dest="records_command", required=True)
    add = with_config(records.add_parser(
        "add", help="record FHIR resources (JSON, Bundle or NDJSON) at this institution",
        description="Validate, de-identify, encrypt into the vault and anchor on chain every resource of the "
        "files given (a folder stands for its .json, .ndjson and .jsonl files, as a FHIR bulk export). "
        "Invalid input records nothing unless --skip-invalid; an empty NDJSON file is reported, not refused."))
    add.add_argument("files", nargs="+", type=Path, metavar="FILE|DIR")
    add.add_argument("--skip-invalid", action="store_true", help="record the valid resources, report the others")
    add.add_argument("--no-wait", action="store_true", help="return once the anchors are in the mempool")
    add.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the anchors to commit")
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=cmd_records_add)
    lst = with_config(records.add_parser("list", help="every anchored record of a patient, consortium-wide"))
    lst.add_argument("--empi", required=True)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_records_list)
    show = with_config(records.add_parser("show", help="one of this institution's records (local only)"))
    show.add_argument("record_id")
    show.add_argument("--deidentified", action="store_true", help="show the released (de-identified) form")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_records_show)
    kanon = with_config(records.add_parser("kanon-report", help="the k-anonymity the released patients reach"))
    kanon.add_argument("--json", action="store_true")
    kanon.set_defaults(func=cmd_records_kanon)

    vault = commands.add_parser("vault", help="the institution's private chain").add_subparsers(
        dest="vault_command", required=True)
    verify = with_config(vault.add_parser(
        "verify", help="check every vault entry's hash link, signature, ciphertexts and on-chain anchor"))
    verify.add_argument("--no-decrypt", action="store_true", help="skip decrypting each entry (faster)")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=cmd_vault_verify)

    empi = commands.add_parser("empi", help="the consortium's master patient index").add_subparsers(
        dest="empi_command", required=True)
    lookup = with_config(empi.add_parser("lookup", help="the EMPI a FHIR Patient would get, with its match grade"))
    lookup.add_argument("patient", metavar="PATIENT.json")
    lookup.add_argument("--json", action="store_true")
    lookup.set_defaults(func=cmd_empi_lookup)
    review = with_config(empi.add_parser("review", help="potential duplicates, with field-level evidence"))
    review.add_argument("--json", action="store_true")
    review.set_defaults(func=cmd_empi_review)
    history = with_config(empi.add_parser("history", help="every change to one EMPI"))
    history.add_argument("empi")
    history.add_argument("--json", action="store_true")
    history.set_defaults(func=cmd_empi_history)
    requests = with_config(empi.add_parser(
        "requests", help="held links and merges: made by this institution, or waiting for its agreement"))
    requests.add_argument("--json", action="store_true")
    requests.set_defaults(func=cmd_empi_requests)
    for name, helptext, positional in (
        ("link", "link an enrolment to an EMPI", (("enrolment", "ENROLMENT"), ("empi", "EMPI"))),
        ("split", "move an enrolment wrongly linked (twins, say) to a new EMPI of its own",
         (("enrolment", "ENROLMENT"),)),
        ("not-duplicate", "close a potential duplicate: the two enrolments are different people",
         (("a", "ENROLMENT"), ("b", "ENROLMENT"))),
        ("merge", "merge one EMPI into another", (("source", "FROM"), ("target", "INTO"))),
        ("unmerge", "undo a merge, given the merge's transaction id", (("merge", "MERGE_TX"),)),
        ("accept", "agree to another institution's held link or merge of patients this one holds",
         (("request", "REQUEST_TX"),)),
    ):
        change = with_config(empi.add_parser(name, help=helptext))
        for dest, metavar in positional:
            change.add_argument(dest, metavar=metavar)
        change.add_argument("--json", action="store_true")
        change.set_defaults(func=cmd_empi_change)

    consent = commands.add_parser("consent", help="patients' consent, on chain").add_subparsers(
        dest="consent_command", required=True)
    for name, helptext in (("grant", "record that a patient allows access"),
                           ("revoke", "record that a patient refuses access")):
        change = with_config(consent.add_parser(name, help=helptext))
        change.add_argument("--empi", required=True)
        change.add_argument("--to", required=True, metavar="INSTITUTION", help="a member, or * for every member")
        change.add_argument("--purpose", action="append", choices=CONSENT_PURPOSES,
                            help="purpose of use (repeatable; default: all)")
        change.add_argument("--scope", metavar="TYPES", help="comma-separated resource types (default: all)")
        change.add_argument("--until", metavar="DATE", help="last day it is in force (default: no end)")
        change.add_argument("--json", action="store_true")
        change.set_defaults(func=cmd_consent_change)
    show_consent = with_config(consent.add_parser("show", help="every grant and revocation for a patient"))
    show_consent.add_argument("--empi", required=True)
    show_consent.add_argument("--json", action="store_true")
    show_consent.set_defaults(func=cmd_consent_show)

    backup = with_config(commands.add_parser(
        "backup", help="an encrypted online backup of this node's stores and keys",
        description="Snapshot the block store, ledger state and vault while the node runs, with the keys, "
        "into one file encrypted under a passphrase (scrypt, AES-256-GCM). Safety data is not included."),
        offline=True)
    backup.add_argument("--out", required=True, metavar="FILE", help="the backup file to create (mode 0600)")
    backup.add_argument("--passphrase-file", help="default: $EHRNODE_BACKUP_PASSPHRASE")
    backup.add_argument("--json", action="store_true")
    backup.set_defaults(func=cmd_backup)
    restore = with_config(commands.add_parser(
        "restore", help="bring a node back from a backup (into an empty data directory)",
        description="Restore the stores and keys of a backup. The node then signs nothing until 2f+1 other "
        "validators report how far the chain got, and catches up from its peers."), offline=True)
    restore.add_argument("file", metavar="FILE")
    restore.add_argument("--passphrase-file", help="default: $EHRNODE_BACKUP_PASSPHRASE")
    restore.add_argument("--json", action="store_true")
    restore.set_defaults(func=cmd_restore)

    from .cli_consortium import add_commands as add_consortium_commands
    from .cli_sharing import add_commands as add_sharing_commands

    add_consortium_commands(consortium, with_config)

    add_sharing_commands(commands, records, with_config)

    demo = commands.add_parser(
        "demo", help="a whole local consortium, end to end, in one command",
        description="Set up three hospitals and a regulator on this machine, run them as real node "
        "processes, commit transactions, crash and recover a node, and stop everything cleanly.",
    )
    demo.add_argument("--dir", type=Path, help="keep the consortium's files here (default: a temporary directory)")
    demo.set_defaults(func=cmd_demo)

    sim = commands.add_parser(
        "sim", help="run seeded fault scenarios against the consensus core on a virtual clock",
        description="Drive N in-memory validators through seeded faults (crashes, partitions, delay, drop, "
        "duplication, Byzantine validators) and check safety and liveness.",
    )
    sim.add_argument("--scenarios", type=_positive, default=100, help="how many scenarios (seeds) to run")
    sim.add_argument("--seed", type=_non_negative, default=0, help="first seed; scenario k uses seed+k")
    sim.add_argument("--validators", type=_positive, default=4, help="validators per scenario (n = 3f+1)")
    sim.add_argument("--byzantine", type=_non_negative, default=None, help="Byzantine validators (default: f)")
    sim.add_argument("--jobs", type=_non_negative, default=0, help="worker processes (default: one per core)")
    sim.add_argument("--json", action="store_true", help="print one JSON document")
    sim.set_defaults(func=cmd_sim)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EhrnodeError as exc:
        print(f"ehrnode: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
