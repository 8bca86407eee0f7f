"""CPU training keeps freed tensor memory for reuse (glibc ``mallopt``), instead of returning it to the system.

glibc serves every allocation above its mmap threshold (32 MB at most) with a fresh ``mmap`` and unmaps it on
``free``, so each large tensor of a training step (stage 2: fc6's 16.8 M weights cast to bf16 by autocast, their
float32 gradient, the activations of a batch) is page-faulted in again at every step. PyTorch's CPU allocator has
no cache of its own; Intel's tuning guides preload jemalloc or tcmalloc for the same reason. Turning glibc's mmap
path off (``M_MMAP_MAX = 0``) and raising its trim threshold keeps the freed pages in the heap, where the next step
reuses them. Measured in benchmarks/README.md (``python train_scripts/benchmark.py --variants default,system_malloc``).

Cost: the process keeps its peak heap (it does not shrink between steps); its peak is unchanged.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2 ** 31 - 1  # the largest value mallopt takes (an int): keep up to 2 GiB of free heap

_applied = False


def retain_freed_memory() -> bool:
    """Apply the setting to this process (once); False where the C library is not glibc (nothing changed)."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
        gnu_libc_version = libc.gnu_get_libc_version  # musl has mallopt as a stub, but not this
    except (OSError, AttributeError):
        return False
    del gnu_libc_version
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    return _applied
