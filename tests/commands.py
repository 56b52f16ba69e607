"""The `ehrnode` command as tests run it: a subprocess of this interpreter, output captured."""

import subprocess
import sys


def cli(*args, env=None, timeout=120):
    """Run ``ehrnode ARGS...``; the CompletedProcess, with text stdout and stderr."""
    return subprocess.run([sys.executable, "-m", "ehrnode.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)
