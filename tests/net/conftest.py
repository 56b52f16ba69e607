import pytest

from ehrnode import crypto
from ehrnode.consortium import init_consortium


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    """A fresh consortium's genesis (A, B, C and the regulator R) and its members' signing keys."""
    root = tmp_path_factory.mktemp("consortium")
    genesis = init_consortium(root, ["A", "B", "C"], "R", base_port=30000)
    keys = {m.name: crypto.Identity.load(root / m.name / "keys" / "signing.pem") for m in genesis.members}
    return genesis, keys
