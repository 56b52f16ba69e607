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
    r.counted("w_total", "Kept elsewhere.", lambda: 7)
    r.labeled_counts("v_total", "By kind.", "kind", lambda: {"b": 2, "a": 1})
    text = r.render()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert "# TYPE x_total counter" in text and float(samples["x_total"]) == 3
    assert float(samples["y"]) == 2.5
    assert "# TYPE w_total counter" in text and float(samples["w_total"]) == 7
    assert float(samples['v_total{kind="a"}']) == 1 and float(samples['v_total{kind="b"}']) == 2
    assert float(samples['z_seconds_bucket{le="0.1"}']) == 1 and float(samples['z_seconds_bucket{le="1"}']) == 2
    assert float(samples['z_seconds_bucket{le="+Inf"}']) == 3 and float(samples["z_seconds_count"]) == 3
    assert float(samples["z_seconds_sum"]) == 5.55
    # The standard process metrics come with every registry.
    assert float(samples["process_open_fds"]) > 0 and "process_cpu_seconds_total" in samples
    assert not any(name.endswith("_created") for name in samples)


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
        assert ok.startswith(b"HTTP/1.1 200 OK") and b"ehrnode_test_total 1.0" in ok
        assert (await get(b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await get(b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        nursery.cancel_scope.cancel()
