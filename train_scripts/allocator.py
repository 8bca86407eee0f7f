"""CPU training keeps freed tensor memory for reuse (glibc ``mallopt``), instead of returning it to the system.

glibc serves every allocation above its mmap threshold (32 MB at most) with a fresh ``mmap`` and unmaps it on
``free``, so each large tensor of a training step (stage 2: fc6's 16.8 M weights cast to bf16 by autocast, their
float32 gradient, the activations of a batch) is page-faulted in again at every step. PyTorch's CPU allocator has
no cache of its own; Intel's tuning guides preload jemalloc or tcmalloc for the same reason. Turning glibc's mmap
path off (``M_MMAP_MAX = 0``) and raising its trim threshold keeps the freed pages in the heap, where the next step
reuses them. Measured: ``python train_scripts/benchmark.py --ab retain_freed_memory`` (benchmarks/README.md).

Cost: the process keeps its peak heap (it does not shrink between steps); its peak is unchanged.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc <malloc.h> parameters and glibc's defaults for them
M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD = -1, 128 * 1024
M_MMAP_MAX, DEFAULT_MMAP_MAX = -4, 65536
TRIM_THRESHOLD_BYTES = 2 ** 31 - 1  # the largest value mallopt takes (an int): keep up to 2 GiB of free heap


def _glibc_mallopt():
    """glibc's ``mallopt``, or None (not Linux, or a C library that is not glibc: musl has no
    ``gnu_get_libc_version``)."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.gnu_get_libc_version  # noqa: B018 - glibc check
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def retain_freed_memory(enable: bool = True) -> bool:
    """Keep freed memory in the heap (``enable``), or restore glibc's defaults; False where glibc is absent."""
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    mmap_max, trim = (0, TRIM_THRESHOLD_BYTES) if enable else (DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD)
    return mallopt(M_MMAP_MAX, mmap_max) == 1 and mallopt(M_TRIM_THRESHOLD, trim) == 1
