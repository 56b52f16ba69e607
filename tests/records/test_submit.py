"""Sending an input in parts: each resource encoded once, the next part encoded while the node
reads the one before, one request in flight, and a refused part ends the input."""

import json

import pytest

from ehrnode.client import ApiError
from ehrnode.records import submit
from ehrnode.records.fhir import Item


class Node:
    """A client that records what it is sent and when, as a node would answer it."""

    def __init__(self, refuse=None):
        self.log = []
        self.requests = {}
        self.refuse = refuse
        self.in_flight = None

    async def send(self, method, params):
        assert self.in_flight is None, "a request was sent before the reply to the one before"
        request_id = len(self.requests) + 1
        self.requests[request_id] = (method, json.loads(params))
        self.in_flight = request_id
        self.log.append(("send", method, ENCODED[0]))
        return request_id

    async def reply(self, request_id):
        assert request_id == self.in_flight
        self.in_flight = None
        method, params = self.requests[request_id]
        self.log.append(("reply", method, ENCODED[0]))
        if method == self.refuse:
            raise ApiError("input too large to record at once", reason="too_large")
        if method == "records.add":
            return {"records": [], "skipped": []}
        return {"staged": len(params["items"])}


ENCODED = [0]  # resources encoded so far


@pytest.fixture
def counted(monkeypatch):
    real = json.dumps

    def dumps(value, *args, **kwargs):
        if isinstance(value, dict) and set(value) == {"source", "resource"}:
            ENCODED[0] += 1
        return real(value, *args, **kwargs)

    ENCODED[0] = 0
    monkeypatch.setattr(submit.json, "dumps", dumps)
    monkeypatch.setattr(submit, "CHUNK_ITEMS", 4)


def _items(count):
    patients = [Item(f"in:p{n}", {"resourceType": "Patient", "id": f"p{n}"}) for n in range(2)]
    rest = [Item(f"in:o{n}", {"resourceType": "Observation", "id": f"o{n}", "note": [{"text": "é" * n}]})
            for n in range(count - 2)]
    return rest + patients  # given Patients last: they are sent first


async def test_parts_are_encoded_once_the_next_while_the_node_reads_one_and_the_last_comes_with_add(counted):
    node = Node()
    items = _items(10)
    await submit.add_items(node, items, wait=False, skip_invalid=True)
    assert [(kind, method) for kind, method, _ in node.log] == [
        ("send", "records.stage"), ("reply", "records.stage"), ("send", "records.stage"),
        ("reply", "records.stage"), ("send", "records.add"), ("reply", "records.add")]
    # Each resource encoded once; the second part was encoded before the first one's reply was
    # awaited, and the third before the second's (a part is known full once the first resource
    # of the next is encoded: that one is counted too).
    assert ENCODED[0] == 10
    assert [count for _, _, count in node.log] == [5, 9, 9, 10, 10, 10]
    sent = [params for _, params in node.requests.values()]
    assert [p["items"][0]["resource"]["resourceType"] for p in sent[:1]] == ["Patient"]
    assert [entry["resource"] for p in sent for entry in p["items"]] == \
        [i.resource for i in items[-2:] + items[:-2]]
    assert [entry["source"] for p in sent for entry in p["items"]][:2] == ["in:p0", "in:p1"]
    assert sent[-1]["skip_invalid"] is True and "skip_invalid" not in sent[0]


async def test_a_refused_part_ends_the_input_nothing_more_is_sent(counted):
    node = Node(refuse="records.stage")
    with pytest.raises(ApiError):
        await submit.add_items(node, _items(10), wait=False)
    assert [method for kind, method, _ in node.log if kind == "send"] == ["records.stage"]


async def test_an_input_of_one_part_is_added_at_once_and_an_empty_one_asks_the_node(counted):
    node = Node()
    await submit.add_items(node, _items(3), wait=False)
    assert [(kind, method) for kind, method, _ in node.log] == [("send", "records.add"), ("reply", "records.add")]
    assert len(node.requests[1][1]["items"]) == 3 and node.requests[1][1]["skip_invalid"] is False
    empty = Node()
    await submit.add_items(empty, [], wait=False)
    assert empty.requests[1] == ("records.add", {"items": [], "skip_invalid": False})
