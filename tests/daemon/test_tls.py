"""TLS with the consortium's own CA: a cluster that runs on it, and connections it refuses."""

import ssl

import pytest
import trio
import trio_websocket

from ehrnode import crypto
from ehrnode.client import ApiClient, ApiError
from ehrnode.config import load_node_config
from ehrnode.localnet import LocalConsortium
from ehrnode.net.protocol import Auth, Hello, decode_frame, encode_frame, sign_transcript
from ehrnode.net.tls import create_ca, issue

from .test_bad_peers import closed, wait_log


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalConsortium(tmp_path_factory.mktemp("tls") / "consortium", tls=True)
    c.start_all()
    trio.run(c.wait_ready)
    yield c
    c.stop_all()


def peer_context(cert, key, ca):
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def tls_peer(cluster, name, ctx, nursery):
    address = cluster.configs[name].peer_listen
    stream = trio.SSLStream(await trio.open_tcp_stream(address.host, address.port), ctx, server_hostname=None)
    await stream.do_handshake()
    return await trio_websocket.wrap_client_stream(nursery, stream, address.host, "/peer")


async def refused(cluster, name, ctx):
    """Whether the node ends a TLS connection from ``ctx`` before answering anything (with TLS 1.3 the
    client's handshake completes before the server has checked the client's certificate)."""
    address = cluster.configs[name].peer_listen
    stream = trio.SSLStream(await trio.open_tcp_stream(address.host, address.port), ctx, server_hostname=None)
    try:
        with trio.fail_after(10):
            await stream.do_handshake()
            await stream.send_all(b"GET /peer HTTP/1.1\r\nHost: x\r\n\r\n")
            return await stream.receive_some() == b""
    except trio.BrokenResourceError:
        return True
    finally:
        await trio.aclose_forcefully(stream)


def test_a_consortium_runs_on_tls_and_commits(cluster):
    async def go():
        submitted = await cluster.call("B", "tx.submit", note="over TLS", wait=True, timeout=30)
        assert submitted["height"]
        await cluster.wait_height(["A", "B", "C", "R"], submitted["height"])
        assert len((await cluster.call("A", "status"))["peers"]) == 3

    trio.run(go)
    for name in ("A", "B", "C", "R"):
        assert (cluster.root / name / "keys" / "tls.key").stat().st_mode & 0o777 == 0o600
    assert (cluster.root / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600


def test_plaintext_another_ca_and_another_members_certificate_are_refused(cluster, tmp_path):
    root = cluster.root
    other_ca = create_ca(tmp_path / "other-ca", "elsewhere")
    issue(*other_ca, "A", tmp_path / "a.pem", tmp_path / "a.key")

    async def go():
        # A port scan (connect, close) is no refusal worth a warning.
        before = cluster.log("C").count('"event": "peer.rejected"')
        address = cluster.configs["C"].peer_listen
        probe = await trio.open_tcp_stream(address.host, address.port)
        await probe.aclose()
        await trio.sleep(0.5)
        assert cluster.log("C").count('"event": "peer.rejected"') == before
        # Plain websocket to a TLS listener: nothing is spoken.
        address = cluster.configs["C"].peer_listen
        with pytest.raises((trio_websocket.HandshakeError, OSError, trio.BrokenResourceError)):
            async with trio_websocket.open_websocket(address.host, address.port, "/peer", use_ssl=False,
                                                     connect_timeout=5):
                pass
        # A certificate for "A" from another CA: refused in the TLS handshake, and logged.
        assert await refused(cluster, "C", peer_context(tmp_path / "a.pem", tmp_path / "a.key",
                                                        root / "ca" / "ca.pem"))
        await wait_log(cluster, "C", '"reason": "tls"')
        # A's genuine certificate, but the handshake proves B: the certificate names someone else.
        async with trio.open_nursery() as nursery:
            ws = await tls_peer(cluster, "C", peer_context(root / "A" / "keys" / "tls.pem",
                                                           root / "A" / "keys" / "tls.key", root / "ca" / "ca.pem"),
                                nursery)
            # Refused on the hello, before the listener signs anything for a name its certificate does not bear.
            await ws.send_message(encode_frame(Hello.fresh(cluster.genesis, "B")))
            assert await closed(ws) == 1008
            nursery.cancel_scope.cancel()
        await wait_log(cluster, "C", '"reason": "tls_identity"')
        # B's own certificate and keys, but a handshake not bound to this TLS channel (as a relay holding
        # CA-minted certificates would produce): the signature does not verify.
        b = crypto.Identity.load(cluster.configs["B"].signing_key_path)
        async with trio.open_nursery() as nursery:
            ws = await tls_peer(cluster, "C", peer_context(root / "B" / "keys" / "tls.pem",
                                                           root / "B" / "keys" / "tls.key", root / "ca" / "ca.pem"),
                                nursery)
            hello = Hello.fresh(cluster.genesis, "B")
            await ws.send_message(encode_frame(hello))
            welcome = decode_frame(await ws.get_message())
            await ws.send_message(encode_frame(Auth(sign_transcript(b, cluster.genesis, hello, welcome.hello,
                                                                    "dialer"))))
            assert await closed(ws) == 1008
            nursery.cancel_scope.cancel()
        await wait_log(cluster, "C", '"reason": "bad_signature"')
        # Still connected to everyone.
        assert len((await cluster.call("C", "status"))["peers"]) == 3

    trio.run(go)


def test_the_local_api_is_tls_and_clients_check_whom_they_reach(cluster, tmp_path):
    config = cluster.configs["A"]

    async def go():
        address = config.api_listen
        with pytest.raises((trio_websocket.HandshakeError, OSError, trio.BrokenResourceError)):
            async with trio_websocket.open_websocket(address.host, address.port, "/", use_ssl=False,
                                                     connect_timeout=5):
                pass
        # A client that trusts another CA refuses the node.
        other_ca, _ = create_ca(tmp_path / "other", "elsewhere")
        text = config.path.read_text().replace('ca = "../ca/ca.pem"', f'ca = "{other_ca}"')
        other = config.path.with_name("other.toml")
        other.write_text(text)
        with pytest.raises(ApiError) as refused:
            async with ApiClient.connect(load_node_config(other)):
                pass
        assert refused.value.reason == "tls"
        # A client for B pointed at A's port: A's certificate does not name B.
        swapped = config.path.with_name("swapped.toml")
        swapped.write_text(cluster.configs["B"].path.read_text().replace(
            str(cluster.configs["B"].api_listen), str(address)))
        with pytest.raises(ApiError, match="not B"):
            async with ApiClient.connect(load_node_config(swapped)):
                pass

    trio.run(go)


def test_a_node_whose_certificate_its_peers_refuse_is_told_why(cluster, tmp_path):
    """A trusts both CAs but holds a certificate from the wrong one: B, C and R refuse it after A's
    own TLS handshake has returned, and A says so at once instead of timing out."""
    config = cluster.configs["A"]
    other_ca = create_ca(tmp_path / "other-ca", "elsewhere")
    keys = config.path.parent / "keys"
    issue(*other_ca, "A", keys / "other-tls.pem", keys / "other-tls.key")
    both = tmp_path / "both.pem"
    both.write_bytes((cluster.root / "ca" / "ca.pem").read_bytes() + other_ca[0].read_bytes())
    cluster.stop("A")
    config.path.write_text(config.path.read_text()
                           .replace('ca = "../ca/ca.pem"', f'ca = "{other_ca[0]}"')
                           .replace('cert = "keys/tls.pem"', 'cert = "keys/other-tls.pem"')
                           .replace('key = "keys/tls.key"', 'key = "keys/other-tls.key"'))
    # Its own certificate checks out against its own CA file, so it starts; peers trust only theirs.
    text = config.path.read_text().replace(f'ca = "{other_ca[0]}"', f'ca = "{both}"')
    config.path.write_text(text)
    cluster.start("A")

    async def go():
        with trio.fail_after(30):
            # B refuses on its own handshake, which may end after another member's refusal.
            while ("refused this node's certificate" not in cluster.log("A")
                   or '"reason": "tls"' not in cluster.log("B")):
                await trio.sleep(0.2)

    trio.run(go)
