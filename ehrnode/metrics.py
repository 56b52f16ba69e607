"""Prometheus metrics: counters, gauges and a histogram, served as text on loopback.

The exposition format is small enough to write directly (``# HELP``, ``# TYPE``, one
sample per line), so the node needs no metrics library and no thread: the endpoint is
one more trio task answering ``GET /metrics``. Gauges are read when scraped, from
callables, so they are never stale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import trio

from .logs import get_logger

MAX_REQUEST = 8192


class Counter:
    def __init__(self, name: str, help_: str) -> None:
        self.name, self.help, self.value = name, help_, 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter", f"{self.name} {_num(self.value)}"]


class Gauge:
    def __init__(self, name: str, help_: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help_, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_num(self.read())}"]


class LabeledCounts:
    """A counter per value of one label, read when scraped (``name{label="value"} count``)."""

    def __init__(self, name: str, help_: str, label: str, read: Callable[[], Mapping[str, float]]) -> None:
        self.name, self.help, self.label, self.read = name, help_, label, read

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for value, count in sorted(self.read().items()):
            lines.append(f'{self.name}{{{self.label}="{value}"}} {_num(count)}')
        return lines


class Histogram:
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help = name, help_
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for bound, count in zip(self.buckets, self.counts, strict=True):
            lines.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {count}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {_num(self.sum)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Registry:
    def __init__(self) -> None:
        self._metrics: list[Any] = []

    def counter(self, name: str, help_: str) -> Counter:
        return self._add(Counter(name, help_))

    def gauge(self, name: str, help_: str, read: Callable[[], float]) -> Gauge:
        return self._add(Gauge(name, help_, read))

    def labeled_counts(self, name: str, help_: str, label: str,
                       read: Callable[[], Mapping[str, float]]) -> LabeledCounts:
        return self._add(LabeledCounts(name, help_, label, read))

    def histogram(self, name: str, help_: str, buckets: tuple[float, ...]) -> Histogram:
        return self._add(Histogram(name, help_, buckets))

    def _add(self, metric: Any) -> Any:
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for metric in self._metrics for line in metric.render()) + "\n"


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
