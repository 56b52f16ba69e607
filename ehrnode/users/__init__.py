"""Users of one node's local API: who they are, what their role lets them do, and how they prove it."""
