"""Prometheus metrics, served on loopback from the node's own trio loop.

The metrics themselves are prometheus_client's (its registry, types and exposition format),
one registry per node, with the standard ``process_*`` (CPU, memory, open file descriptors)
and ``python_*`` metrics beside the node's own. The endpoint is one more trio task answering
``GET /metrics``: no thread and no second HTTP server. Gauges and the counters the node keeps
itself are read when scraped, from callables, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import prometheus_client
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .logs import get_logger

MAX_REQUEST = 8192

# A ``*_created`` series beside every counter tells an operator nothing the process start
# time does not already: leave them out, as the exposition had them before.
prometheus_client.disable_created_metrics()


class _ReadCounters(Collector):
    """Counters the node keeps as plain numbers elsewhere, read when scraped."""

    def __init__(self) -> None:
        self._plain: list[tuple[str, str, Callable[[], float]]] = []
        self._labeled: list[tuple[str, str, str, Callable[[], Mapping[str, float]]]] = []

    def plain(self, name: str, help_: str, read: Callable[[], float]) -> None:
        self._plain.append((name, help_, read))

    def labeled(self, name: str, help_: str, label: str, read: Callable[[], Mapping[str, float]]) -> None:
        self._labeled.append((name, help_, label, read))

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, help_, read in self._plain:
            yield CounterMetricFamily(name, help_, value=read())
        for name, help_, label, read_counts in self._labeled:
            family = CounterMetricFamily(name, help_, labels=[label])
            for value, count in sorted(read_counts().items()):
                family.add_metric([value], count)
            yield family


class Histogram(Collector):
    """A histogram whose bucket bounds keep the form they were written in (``le="1"``, as the
    node's dashboards and alerts name them), where the client library would print ``le="1.0"``."""

    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help = name, help_
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1

    def collect(self) -> Iterator[HistogramMetricFamily]:
        buckets = [(_bound(b), float(c)) for b, c in zip(self.bounds, self.counts, strict=True)]
        yield HistogramMetricFamily(self.name, self.help, buckets=[*buckets, ("+Inf", float(self.count))],
                                    sum_value=self.sum)


def _bound(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Registry:
    """One node's metrics: what it counts and observes, and what is read from it when scraped."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        prometheus_client.ProcessCollector(registry=self.registry)
        prometheus_client.PlatformCollector(registry=self.registry)
        prometheus_client.GCCollector(registry=self.registry)
        self._read = _ReadCounters()
        self.registry.register(self._read)

    def counter(self, name: str, help_: str) -> Counter:
        return Counter(name, help_, registry=self.registry)

    def gauge(self, name: str, help_: str, read: Callable[[], float]) -> Gauge:
        gauge = Gauge(name, help_, registry=self.registry)
        gauge.set_function(read)
        return gauge

    def counted(self, name: str, help_: str, read: Callable[[], float]) -> None:
        """A counter whose value the node keeps itself (``read()`` when scraped)."""
        self._read.plain(name, help_, read)

    def labeled_counts(self, name: str, help_: str, label: str, read: Callable[[], Mapping[str, float]]) -> None:
        """A counter per value of one label, read when scraped (``name{label="value"} count``)."""
        self._read.labeled(name, help_, label, read)

    def histogram(self, name: str, help_: str, buckets: tuple[float, ...]) -> Histogram:
        histogram = Histogram(name, help_, buckets)
        self.registry.register(histogram)
        return histogram

    def render(self) -> str:
        return generate_latest(self.registry).decode()


async def serve(registry: Registry, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Answer ``GET /metrics`` on ``host:port``; anything else gets 404 or 400."""
    log = get_logger()

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.fail_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
            line = request.split(b"\r\n", 1)[0].split()
            if len(line) != 3 or line[0] != b"GET":
                status, body = "400 Bad Request", "bad request\n"
            elif line[1].split(b"?")[0] != b"/metrics":
                status, body = "404 Not Found", "not found; metrics are at /metrics\n"
            else:
                status, body = "200 OK", registry.render()
            data = body.encode()
            head = (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                    f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
            with trio.fail_after(5):
                await stream.send_all(head + data)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, port, host=host))
        log.info("metrics.listening", address=f"{host}:{port}")
        task_status.started(listeners)
