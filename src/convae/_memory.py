"""Keep freed buffers for reuse instead of handing them back to the OS between steps.

glibc's malloc returns large freed blocks to the kernel (munmap, or trimming the heap), so
every training step page-faults its activation buffers back in and the kernel zeroes them:
about 8,000 faults a step for the default MNIST model, 25,000 for CIFAR-10's, inside the
convolutions' time. Serving blocks up to 32 MiB from the heap and trimming it only past
256 MiB makes a step fault-free; resident memory stays at the step's peak, which it reaches
anyway. Measured in benchmarks/RESULTS.md ("Speed").
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import sys

from .errors import ConfigError

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_MMAP_THRESHOLD = 32 << 20  # glibc's upper limit on 64-bit systems
_TRIM_THRESHOLD = 256 << 20
_TRIM_THRESHOLD_ALL_SIZES = 1 << 30  # a step's maps of 64 MiB add up past 256 MiB, then get trimmed
_applied: dict[bool, bool] = {}  # all_sizes -> whether it worked; mallopt settings are the process's


def keep_freed_memory(all_sizes: bool = False) -> bool:
    """Tune glibc's malloc for repeated same-sized buffers, once per process; False where it can't.

    `all_sizes` serves blocks over 32 MiB from the heap as well (no mmap at all), for the
    largest maps, which the threshold cannot reach: the wide cifar10 preset's first stage
    (64 MiB a batch) trains 15-24% faster so. It changes how the whole process allocates, so
    only the CLI, which owns its process, asks for it; a Python session keeps mmap for what
    it frees. Once set, it stays: a later call without it changes nothing. A setting the
    user made through glibc's environment variables is left as it is.
    """
    if True in _applied:  # the stronger setting stays
        return _applied[True]
    if all_sizes not in _applied:
        _applied[all_sizes] = _tune(all_sizes)
    return _applied[all_sizes]


def _glibc(name: str, *argtypes):
    """glibc's function `name` with its argument types set, or None (not Linux with glibc)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    return function


def _tune(all_sizes: bool) -> bool:
    mallopt = _glibc("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return False
    done = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        done &= mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        trim = _TRIM_THRESHOLD_ALL_SIZES if all_sizes else _TRIM_THRESHOLD
        done &= mallopt(_M_TRIM_THRESHOLD, trim) == 1
    if all_sizes and "MALLOC_MMAP_MAX_" not in os.environ:
        done &= mallopt(_M_MMAP_MAX, 0) == 1
    return bool(done)


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the kernel (glibc's ``malloc_trim``); False where it can't.

    For the end of a phase that kept its freed buffers for reuse (:func:`keep_freed_memory`), when
    a different phase follows: the probe calls it between extraction and its fits, which would
    otherwise hold on to up to the trim threshold of free heap (the mnist preset's probe: 2.53 GB
    peak, RESULTS.md). Not after every extraction: the next one would fault its buffers back in.
    """
    trim = _glibc("malloc_trim", ctypes.c_size_t)
    if trim is None:
        return False
    trim(0)
    return True


# ---------------------------------------------------------------------------------------------
# the memory budget: what a command may still allocate (models.memory and the data loaders)
# ---------------------------------------------------------------------------------------------
MEMORY_ENV = "CONVAE_MEMORY_LIMIT"
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def available_bytes() -> tuple[int | None, str]:
    """(bytes of memory this process may still use, where that figure comes from); None: unknown.

    $CONVAE_MEMORY_LIMIT (bytes, or e.g. 8G) when set: a user who knows better raises or lowers
    it there. Else ``MemAvailable`` and what the cgroup's limit leaves, the smaller.
    """
    override = os.environ.get(MEMORY_ENV)
    if override:
        return parse_bytes(override), f"${MEMORY_ENV}"
    found = [v for v in (_meminfo_available(), _cgroup_left()) if v is not None]
    return (min(found), "available memory") if found else (None, "")


def parse_bytes(text: str) -> int:
    """'8G', '512m', '1000000' -> bytes; ConfigError for anything else."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"${MEMORY_ENV}={text[:40]!r}: give bytes, e.g. 8G or 512M")
    return int(value * _UNITS[unit])


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _cgroup_left() -> int | None:
    """What the cgroup (v2) memory limit leaves, where one is set: a container's real ceiling."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            return max(int(limit) - int(f.read().strip()), 0)
    except (OSError, ValueError):
        return None
