"""The daemon's parts around the node: what happens when blocks commit."""
