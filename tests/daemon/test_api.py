"""The local API and the CLI against a running consortium."""

import json
import ssl

import pytest
import trio
import trio_websocket

from ehrnode.client import ApiClient, ApiError
from tests.commands import cli


def api_ssl(config):
    """What a raw websocket client to the node's API uses: the consortium CA with TLS on."""
    if config.tls is None:
        return False
    ctx = ssl.create_default_context(cafile=str(config.tls.ca))
    ctx.check_hostname = False  # the certificate names the member, not the host
    return ctx


async def test_api_and_cli(cluster):
    cluster.start_all()
    await cluster.wait_ready()
    config = cluster.configs["A"]
    address = config.api_listen

    # No token, or a wrong one: refused before any JSON-RPC, and logged.
    for headers in ([], [(b"authorization", b"Bearer wrong")]):
        with pytest.raises(trio_websocket.ConnectionRejected) as err:
            async with trio_websocket.open_websocket(address.host, address.port, "/", use_ssl=api_ssl(config),
                                                     extra_headers=headers):
                pass
        assert err.value.status_code == 401
    assert '"event": "auth.denied"' in cluster.log("A")

    async with ApiClient.connect(config) as client:
        # Bad requests get JSON-RPC errors and the connection stays usable.
        await client._ws.send_message("{not json")
        assert json.loads(await client._ws.get_message())["error"]["code"] == -32700
        with pytest.raises(ApiError, match="unknown method"):
            await client.call("records.delete")
        with pytest.raises(ApiError, match="height must be"):
            await client.call("block.get", height=-1)
        with pytest.raises(ApiError) as missing:
            await client.call("block.get", height=10**9)
        assert missing.value.reason == "not_found"
        with pytest.raises(ApiError, match="note must be a string"):
            await client.call("tx.submit", note=5)
        with pytest.raises(ApiError) as too_long:
            await client.call("tx.submit", note="病" * 5000)
        assert too_long.value.reason == "invalid"
        with pytest.raises(ApiError, match="height out of range"):
            await client.call("block.get", height=2**64)
        batch = await client.call("tx.submit_batch", notes=["ok", "x" * 5000, "also ok"])
        assert batch["tx_ids"][0] and batch["tx_ids"][1] is None and batch["tx_ids"][2]
        assert batch["errors"] == [{"index": 1, "reason": "invalid"}]
        status = await client.call("status")
        assert {"node", "height", "head", "round", "peers", "mempool"} <= set(status)

        # A subscription announces committed blocks.
        await client.call("blocks.subscribe")
        submitted = await cluster.call("B", "tx.submit", note="watched")
        announced = []
        with trio.fail_after(30):
            async for note in client.notifications():
                announced.append(note["params"]["height"])
                if note["params"]["txs"]:
                    block = await client.call("block.get", height=note["params"]["height"])
                    if submitted["tx_id"] in [tx["id"] for tx in block["txs"]]:
                        break
        assert announced == list(range(announced[0], announced[-1] + 1))  # every block, in order
        # The same block's ids and statuses, read from the ledger without opening anything.
        light = await client.call("block.get", height=block["height"], ids=True)
        assert light["txs"] == [{"id": tx["id"], "status": "ok"} for tx in block["txs"]]
        assert {k: v for k, v in light.items() if k != "txs"} == {k: v for k, v in block.items() if k != "txs"}
        with pytest.raises(ApiError, match="ids must be"):
            await client.call("block.get", height=block["height"], ids="yes")

    # The CLI, per the command-line contract.
    path = str(config.path)
    run = cli("tx", "submit", "--config", path, "--note", "from the cli", "--wait", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert set(result) == {"tx_id", "height"} and result["height"] >= 1
    run = cli("block", "get", "--config", path, "--height", str(result["height"]), "--json")
    block = json.loads(run.stdout)
    assert {"height", "id", "parent", "round", "txs"} <= set(block)
    assert result["tx_id"] in [tx["id"] for tx in block["txs"]]
    status = json.loads(cli("status", "--config", path, "--json").stdout)
    assert status["node"] == "A" and len(status["peers"]) == 3
    env = {"EHRNODE_CONFIG": path, "PATH": "/usr/bin:/bin"}
    assert json.loads(cli("status", "--json", env=env).stdout)["node"] == "A"

    # Prometheus metrics on loopback.
    metrics_at = config.metrics_listen
    stream = await trio.open_tcp_stream(metrics_at.host, metrics_at.port)
    await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
    body = b""
    while chunk := await stream.receive_some(65536):
        body += chunk
    samples = dict(line.rsplit(" ", 1) for line in body.decode().split("\r\n\r\n", 1)[1].splitlines()
                   if line and not line.startswith("#"))
    assert float(samples["ehrnode_height"]) >= result["height"]
    assert float(samples["ehrnode_peers_connected"]) == 3
    assert float(samples["ehrnode_transactions_committed_total"]) >= 3
    assert float(samples["ehrnode_commit_latency_seconds_count"]) >= 1


async def test_a_submitter_faster_than_the_consortium_commits_is_held_to_its_pace(cluster):
    """Past OWN_BACKLOG transactions of its own waiting, a node's client submissions wait for
    commits: refused with ``backlog`` once their time is up, taken as soon as blocks commit."""
    from ehrnode.daemon.node import OWN_BACKLOG

    for name in ("A", "B"):  # two of four: no quorum, nothing commits
        cluster.start(name)
    await cluster.wait_ready(["A", "B"])
    async with ApiClient.connect(cluster.configs["A"]) as client:
        batch = await client.call("tx.submit_batch", notes=[f"n{i}" for i in range(OWN_BACKLOG)])
        assert batch["errors"] == [] and all(batch["tx_ids"])
        with pytest.raises(ApiError) as held:
            await client.call("tx.submit", note="one more", timeout=0.5)
        assert held.value.reason == "backlog" and f"at most {OWN_BACKLOG}" in str(held.value)
        late = await client.call("tx.submit_batch", notes=["x", "y"], timeout=0.5)
        assert late["tx_ids"] == [None, None]
        assert late["errors"] == [{"index": 0, "reason": "backlog"}, {"index": 1, "reason": "backlog"}]
        assert (await client.call("status"))["mempool"] == OWN_BACKLOG  # nothing refused was signed

        async with trio.open_nursery() as nursery:
            answer = {}

            async def submit() -> None:
                answer.update(await client.call("tx.submit", note="after the backlog", wait=True, timeout=60))

            nursery.start_soon(submit)
            cluster.start("C")  # a quorum: blocks commit, room is made, the waiting call goes on
        assert answer["height"] is not None
    heights = await client_heights(cluster, batch["tx_ids"])
    assert all(h is not None for h in heights)


async def client_heights(cluster, tx_ids):
    async with ApiClient.connect(cluster.configs["B"]) as client:
        return list((await client.call("txs.wait", tx_ids=tx_ids, timeout=60))["heights"].values())


def test_run_with_a_bad_config_is_one_line_and_exit_2(tmp_path):
    missing = cli("run", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    bad = tmp_path / "node.toml"
    bad.write_text('name = "A"\n')
    run = cli("run", "--config", str(bad))
    assert run.returncode == 2 and "missing field" in run.stderr and run.stderr.count("\n") == 1
    no_config = cli("status", env={"PATH": "/usr/bin:/bin"})
    assert no_config.returncode == 2 and "EHRNODE_CONFIG" in no_config.stderr


def test_status_of_a_node_that_is_not_running_is_a_clear_error(tmp_path):
    from ehrnode.consortium import init_consortium

    init_consortium(tmp_path, ["A"], "R", base_port=39100)
    run = cli("status", "--config", str(tmp_path / "A" / "node.toml"))
    assert run.returncode == 2 and "has the node been started" in run.stderr


def test_an_empty_token_file_is_replaced_and_never_authenticates(tmp_path):
    from ehrnode.errors import CryptoError
    from ehrnode.users.store import TOKEN_FILE, UserStore, read_token

    (tmp_path / TOKEN_FILE).write_text("")
    with pytest.raises(CryptoError, match="empty"):
        read_token(tmp_path)
    store = UserStore(tmp_path, "A")
    admin, adopted = store.ensure_admin()
    token = read_token(tmp_path)
    assert not adopted and len(token) >= 32 and store.by_token(token) == admin and store.by_token("") is None
    assert oct((tmp_path / TOKEN_FILE).stat().st_mode & 0o777) == "0o600"
    assert store.ensure_admin() == (admin, False) and read_token(tmp_path) == token
    # A token put in place by hand (an older node's, say) becomes the admin's credential.
    (tmp_path / TOKEN_FILE).write_text("f" * 64)
    admin2, adopted = store.ensure_admin()
    assert adopted and store.by_token("f" * 64) == admin2 and store.by_token(token) is None
    assert admin2.pseudonym == admin.pseudonym


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path):
    import socket

    from ehrnode.consortium import init_consortium

    from .cluster import free_base_port

    base = free_base_port(2)
    init_consortium(tmp_path, ["A"], "R", base_port=base)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", base))
        blocker.listen()
        run = cli("run", "--config", str(tmp_path / "A" / "node.toml"))
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].startswith("ehrnode: cannot listen")
