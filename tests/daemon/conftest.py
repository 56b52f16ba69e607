import pytest

from .cluster import Cluster


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path / "consortium")
    yield c
    c.stop_all()
