import trio

from ehrnode import metrics


def test_exposition_format():
    r = metrics.Registry()
    c = r.counter("x_total", "Things.")
    c.inc(3)
    r.gauge("y", "Now.", lambda: 2.5)
    h = r.histogram("z_seconds", "Latency.", (0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    text = r.render()
    assert "# TYPE x_total counter\nx_total 3\n" in text
    assert "y 2.5\n" in text
    assert 'z_seconds_bucket{le="0.1"} 1\n' in text and 'z_seconds_bucket{le="1"} 2\n' in text
    assert 'z_seconds_bucket{le="+Inf"} 3\n' in text and "z_seconds_count 3\n" in text


async def test_endpoint_serves_metrics_and_refuses_the_rest():
    r = metrics.Registry()
    r.counter("ehrnode_test_total", "A test.").inc()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(metrics.serve, r, "127.0.0.1", 0)
        port = listeners[0].socket.getsockname()[1]

        async def get(request: bytes) -> bytes:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(request)
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
            return data

        ok = await get(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK") and b"ehrnode_test_total 1" in ok
        assert (await get(b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await get(b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        nursery.cancel_scope.cancel()
