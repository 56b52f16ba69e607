"""The daemon: the node that wires stores, consensus, peers and services together (`node.py`),
and what follows each commit besides the ledger (`commits.py`)."""
