import pytest

from .cluster import Cluster


@pytest.fixture
def cluster(request, tmp_path):
    """A four-member consortium (not started). TLS as by default, unless the test module sets
    ``PLAINTEXT = True``: its hostile peers speak the wire protocol in clear (test_tls.py covers
    what TLS refuses)."""
    c = Cluster(tmp_path / "consortium", tls=not getattr(request.module, "PLAINTEXT", False))
    yield c
    c.stop_all()
