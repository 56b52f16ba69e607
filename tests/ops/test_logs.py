import io
import json
import logging

from ehrnode import logs


def test_json_lines_with_context_and_a_journald_priority_prefix(monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    out = io.StringIO()
    logs.configure("info", json_output=True, stream=out)
    log = logs.get_logger(node="A")
    log.info("peer.connected", peer="B")
    log.debug("not.shown")
    log.warning("peer.rejected", reason="bad_signature")
    logging.getLogger("trio-websocket").warning("library says %s", "hi")
    lines = out.getvalue().splitlines()
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<4>"]
    first = json.loads(lines[0][3:])
    assert first["event"] == "peer.connected" and first["node"] == "A" and first["peer"] == "B"
    assert json.loads(lines[2][3:])["event"] == "library says hi"


def test_no_prefix_outside_the_journal(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    logs.configure("info", json_output=True, stream=out)
    logs.get_logger().info("node.started")
    assert json.loads(out.getvalue())["event"] == "node.started"
