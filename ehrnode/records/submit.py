"""Sending FHIR files to a node for recording, as the CLI, the demo and the benchmarks do.

Files are read and parsed here, so a file that is not FHIR at all (truncated
JSON, bad bytes, too large) is refused before the node hears of it. The
resources then travel in messages of bounded size (``records.stage``) and are
recorded by one ``records.add``: the node validates and records the whole
input at once, or nothing of it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..errors import FhirError
from . import fhir

#: Resources per staging message, and bytes of JSON (the node accepts messages of 4 MiB).
CHUNK_ITEMS = 2000
CHUNK_BYTES = 2 * 1024 * 1024
MAX_RESOURCE_BYTES = 3 * 1024 * 1024


@dataclass
class AddResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    heights: dict[str, int | None] = field(default_factory=dict)


def read_inputs(paths: Iterable[Path], *, skip_invalid: bool) -> fhir.Intake:
    """Parse every file (a directory stands for its FHIR files, as a bulk export's folder); the
    items to send (validated by the node), the problems of the rest, the files with no resource.
    Raises FhirError listing the problems unless ``skip_invalid``."""
    items: list[fhir.Item] = []
    problems: list[fhir.Problem] = []
    empty: list[str] = []
    for _, got, bad in fhir.read_each((Path(p) for p in paths), empty):
        items.extend(got)
        problems.extend(bad)
    for item in items:
        size = len(json.dumps(item.resource))
        if size > MAX_RESOURCE_BYTES:
            problems.append(fhir.Problem(item.source, item.resource.get("resourceType"), item.resource.get("id"),
                                         None, f"resource of {size} bytes is over the {MAX_RESOURCE_BYTES}-byte limit"))
    if problems and not skip_invalid:
        lines = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise FhirError(f"{len(problems)} problem(s) in the input; nothing was recorded "
                        f"(--skip-invalid records the rest):\n{lines}{more}", reason="invalid_input")
    bad_sources = {p.source for p in problems}
    return fhir.Intake([i for i in items if i.source not in bad_sources], problems, empty)


def _is_patient(item: fhir.Item) -> bool:
    return isinstance(item.resource, dict) and item.resource.get("resourceType") == "Patient"


def chunks(items: list[fhir.Item]) -> Iterator[tuple[int, str]]:
    """The items in parts of at most ``CHUNK_ITEMS`` resources and about ``CHUNK_BYTES`` of JSON,
    each as (resources, their JSON array). Each resource is encoded once, to size its part and to
    send it, and only as its part is taken: the node reads one part while the next is encoded."""
    chunk: list[str] = []
    size = 0
    for item in items:
        entry = json.dumps({"source": item.source, "resource": item.resource})
        if chunk and (len(chunk) >= CHUNK_ITEMS or size + len(entry) > CHUNK_BYTES):
            yield len(chunk), "[" + ", ".join(chunk) + "]"
            chunk, size = [], 0
        chunk.append(entry)
        size += len(entry)
    if chunk:
        yield len(chunk), "[" + ", ".join(chunk) + "]"


def _params(items: str, **more: Any) -> str:
    """The JSON text of a call's params: ``items`` (a JSON array from :func:`chunks`) and ``more``,
    each value encoded by ``json.dumps``."""
    return "{" + ", ".join([f'"items": {items}', *(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in more.items())]) + "}"


async def add_items(client: Any, items: list[fhir.Item], *, skip_invalid: bool = False, wait: bool = True,
                    timeout: float = 120.0, progress: Callable[[str], None] = lambda _: None) -> AddResult:
    """Record ``items`` at the client's node; with ``wait``, also the height of each anchor.

    The input is staged part by part (``records.stage``), each part encoded while the node reads
    the one before, and recorded by one ``records.add``. The Patients are sent first: the node
    asks for the OPRF evaluations their EMPI enrolments need as soon as their part is staged,
    while the rest of the input arrives."""
    add = _params("[]", skip_invalid=skip_invalid)  # an empty input: the node says there is nothing to record
    staged, sent = 0, None
    for count, part in chunks([i for i in items if _is_patient(i)] + [i for i in items if not _is_patient(i)]):
        if sent is not None:
            await client.reply(sent)  # a refused part stops the input here: nothing more is sent
            progress(f"staged {staged}/{len(items)} resources")
        if staged + count == len(items):  # the last part comes with records.add
            add = _params(part, skip_invalid=skip_invalid)
            break
        sent = await client.send("records.stage", _params(part))
        staged += count
    reply = await client.reply(await client.send("records.add", add))
    result = AddResult(reply["records"], reply["skipped"])
    tx_ids = [r["tx_id"] for r in result.records if r["tx_id"]]
    progress(f"recorded {len(tx_ids)} new records; waiting for their anchors" if wait else "recorded")
    if wait and tx_ids:
        deadline = trio.current_time() + timeout
        waiting = list(dict.fromkeys(tx_ids))  # one transaction anchors many records
        while waiting and trio.current_time() < deadline:
            step = max(0.1, min(deadline - trio.current_time(), 60.0))
            heights = (await client.call("txs.wait", tx_ids=waiting, timeout=step))["heights"]
            result.heights.update(heights)
            waiting = [t for t in waiting if heights.get(t) is None]
            anchored = sum(1 for t in tx_ids if result.heights.get(t) is not None)
            progress(f"{anchored}/{len(tx_ids)} anchors committed")
        await _fill_empis(client, result, deadline)
    return result


async def _fill_empis(client: Any, result: AddResult, deadline: float) -> None:
    """Each record's EMPI, decided on chain once its patient's enrolment is committed."""
    while True:
        unknown = sorted({r["patient"] for r in result.records if r.get("empi") is None})
        if not unknown:
            return
        empis = await client.call("empi.of", patients=unknown)
        for row in result.records:
            if row.get("empi") is None:
                row["empi"] = empis.get(row["patient"])
        if trio.current_time() >= deadline or all(empis.values()):
            return
        await trio.sleep(0.2)
