"""Real processes, real signals: start a `convae` command, wait for a moment, send a signal.

    outcome = kill_when(["fit", "digits", "--out", run], when=exists(run / "checkpoint" / "last.pt"))
    assert outcome.killed

`when` is any zero-argument predicate, polled until it holds (then `delay` seconds more), so a
kill lands at a chosen point: before the first checkpoint (``exists(run / "config.json")``),
inside a later epoch (``history_rows(run, 1)`` plus a delay), or in the middle of writing a
file: ``pause_replace="*/checkpoint/last.pt"`` starts the command through a shim that, at the
``pause_at``-th atomic rename onto a matching path, writes a marker file and sleeps, so the
kill lands after the temporary file is written and before it replaces the previous one (the
widest window a crash mid-write can have). ``outcome.paused`` says that point was reached.

The process runs in its own session and, by default, the signal goes to its whole process
group, as a terminal's Ctrl-C or a job scheduler's kill would: workers (DataLoader, torchrun)
get it too. Nothing here is specific to `fit`; `extract` and distributed runs use the same calls.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CONVAE = str(Path(sys.executable).parent / "convae")

# Runs `convae ARGS` with os.replace paused at the N-th rename onto a path matching a pattern.
_PAUSE_SHIM = r"""
import fnmatch, os, sys, time
pattern, at, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
real_replace, seen = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if fnmatch.fnmatch(os.fspath(dst), pattern):
        seen[0] += 1
        if seen[0] == at:
            open(marker, "w").close()
            time.sleep(3600)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = ["convae", *sys.argv[4:]]
from convae.cli import main
main()
"""


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    killed: bool  # the signal was sent while the command still ran
    paused: bool  # the paused rename was reached (pause_replace only)


def start(
    args: Sequence[object],
    *,
    pause_replace: str | None = None,
    pause_at: int = 1,
    marker: Path | None = None,
    env: dict | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.Popen:
    """Start `convae ARGS` in a new session (its own process group), output captured."""
    args = [str(a) for a in args]
    if pause_replace is not None:
        assert marker is not None, "pause_replace needs a marker path"
        cmd = [sys.executable, "-c", _PAUSE_SHIM, pause_replace, str(pause_at), str(marker), *args]
    else:
        cmd = [CONVAE, *args]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 180, poll: float = 0.01) -> bool:
    """Poll `predicate` until it holds (True), the process ends or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(poll)
    return False


def kill_when(
    args: Sequence[object],
    when: Callable[[], bool],
    *,
    sig: int = signal.SIGKILL,
    delay: float = 0.0,
    group: bool = True,
    timeout: float = 180,
    pause_replace: str | None = None,
    pause_at: int = 1,
    marker: Path | None = None,
    env: dict | None = None,
) -> Outcome:
    """Run `convae ARGS`, send `sig` once `when()` holds (plus `delay` s), wait for it to end.

    With `pause_replace`, `when` is combined with the pause: the signal is sent once the
    command sleeps at the paused rename. The process group is always reaped at the end.
    """
    if pause_replace is not None:
        marker = marker or Path(os.environ.get("TMPDIR", "/tmp")) / f"convae-pause-{os.getpid()}-{time.time_ns()}"
        condition = when
        when = lambda: marker.exists() and condition()  # noqa: E731
    proc = start(args, pause_replace=pause_replace, pause_at=pause_at, marker=marker, env=env)
    killed = False
    try:
        reached = wait_for(when, proc, timeout)
        if reached and delay:
            time.sleep(delay)
        if proc.poll() is None:
            (os.killpg if group else os.kill)(proc.pid, sig)
            killed = True
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:
            try:  # leftovers of the group (e.g. workers of a killed parent)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    paused = marker is not None and marker.exists()
    if marker is not None:
        marker.unlink(missing_ok=True)
    return Outcome(proc.returncode, stdout, stderr, killed, paused)


def run(args: Sequence[object], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`convae ARGS` to completion; AssertionError with its stderr when `check` and it fails."""
    proc = subprocess.run([CONVAE, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"convae {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


# -- conditions ---------------------------------------------------------------------------------
def exists(path: str | os.PathLike) -> Callable[[], bool]:
    path = Path(path)
    return lambda: path.exists()


def history_rows(run_dir: str | os.PathLike, n: int) -> Callable[[], bool]:
    """At least `n` epochs recorded in RUN_DIR/history.csv."""
    path = Path(run_dir) / "history.csv"

    def check() -> bool:
        try:
            return len(path.read_text().splitlines()) - 1 >= n
        except OSError:
            return False

    return check


def temp_files(directory: str | os.PathLike) -> list[Path]:
    """The temporary files of unfinished atomic writes under `directory`."""
    return sorted(p for p in Path(directory).rglob(".*.tmp"))
