"""The read path: pulls between institutions, access decisions, audit and event feeds."""
