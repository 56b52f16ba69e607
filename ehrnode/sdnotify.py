"""The systemd notification protocol (``Type=notify``), without a dependency.

systemd passes the path of an AF_UNIX datagram socket in ``NOTIFY_SOCKET`` (a leading
``@`` means an abstract socket). The node sends ``READY=1`` once its listeners are
bound, ``WATCHDOG=1`` from its event loop every half ``WATCHDOG_USEC`` (so a wedged loop
gets the service restarted), ``STATUS=...`` lines for ``systemctl status``, and
``STOPPING=1`` when it begins to shut down. Outside systemd every call is a no-op.
A send that fails is logged once, not hidden.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from .logs import get_logger


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if path:
            self._address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2_000_000
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True if it was sent (or there is no systemd)."""
        if self._address is None:
            return True
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                get_logger().warning("systemd.notify_failed", error=str(exc))
            return False
        return True
