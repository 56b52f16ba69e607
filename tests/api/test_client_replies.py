"""The API client's requests and replies: matched by id, none lost when two are in flight,
notifications kept for the subscriber, and params encoded by the caller taken as they are."""

import json

import pytest
import trio

from ehrnode.client import ApiClient, ApiError


class Wire:
    """A websocket with the node's messages queued in advance, recording what is sent."""

    def __init__(self, incoming):
        self.incoming = [json.dumps(m) for m in incoming]
        self.sent = []

    async def send_message(self, text):
        self.sent.append(json.loads(text))

    async def get_message(self):
        await trio.lowlevel.checkpoint()
        return self.incoming.pop(0)


async def test_replies_are_matched_by_id_and_one_for_a_request_still_awaited_is_kept():
    wire = Wire([
        {"jsonrpc": "2.0", "method": "block.committed", "params": {"height": 7}},
        {"jsonrpc": "2.0", "id": 2, "result": "second"},
        {"jsonrpc": "2.0", "id": 99, "result": "nobody asks"},
        {"jsonrpc": "2.0", "id": 1, "error": {"message": "no", "data": {"reason": "too_large"}}},
    ])
    client = ApiClient(wire)
    first = await client.send("records.stage", '{"items": []}')
    second = await client.send("status", {})
    with pytest.raises(ApiError) as refused:
        await client.reply(first)  # reads past the second's reply, keeping it
    assert refused.value.reason == "too_large"
    assert await client.reply(second) == "second"
    assert [m["params"] for m in client._notifications] == [{"height": 7}]
    assert wire.sent == [{"jsonrpc": "2.0", "id": 1, "method": "records.stage", "params": {"items": []}},
                         {"jsonrpc": "2.0", "id": 2, "method": "status", "params": {}}]


async def test_encoded_params_must_be_an_object():
    client = ApiClient(Wire([]))
    for bad in ('"items"', "[1]", '{"a": 1} , "b"'):
        with pytest.raises(ValueError):
            await client.send("records.stage", bad)
