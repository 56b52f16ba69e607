"""ehrnode: share patient records across institutions over a consortium chain."""

__version__ = "0.1.0"
