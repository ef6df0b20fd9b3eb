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
import functools
import os
import platform
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's upper limit on 64-bit systems
_TRIM_THRESHOLD = 256 << 20


@functools.cache
def keep_freed_memory() -> bool:
    """Tune glibc's malloc for repeated same-sized buffers, once per process; False where it can't.

    A threshold the user set through glibc's environment variables is left as it is.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    done = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        done &= mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        done &= mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    return bool(done)
