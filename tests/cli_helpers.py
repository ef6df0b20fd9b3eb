"""Running the installed `convae` entry point in a subprocess, as a user would."""

import shutil
import subprocess
import sys
from pathlib import Path

CONVAE = shutil.which("convae", path=str(Path(sys.executable).parent)) or "convae"


def convae(*args, check=True, timeout=300, **kwargs):
    proc = subprocess.run([CONVAE, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"convae {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def assert_user_error(proc, *fragments, prefixes=("convae: error:",)):
    """Exit code 2, no traceback, and a last line that starts with one of `prefixes` and names `fragments`."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith(tuple(prefixes)), proc.stderr
    for fragment in fragments:
        assert fragment in lines[-1], proc.stderr
