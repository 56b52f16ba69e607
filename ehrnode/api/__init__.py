"""The local API: JSON-RPC 2.0 over a websocket on loopback, for the CLI and the hospital's systems.

``server.py`` accepts connections, authenticates users and routes each call by the method
table (``methods.py``) to its handler (``chain.py``, ``records.py``, ``empi.py``,
``consent.py``, ``sharing.py``, ``users.py``); handlers see the node only through
:class:`~.facade.NodeFacade`. ``docs/api.md`` is the reference, generated from the table.
"""

from .methods import CATALOGUE, TABLE
from .server import ApiServer

__all__ = ["CATALOGUE", "TABLE", "ApiServer"]
