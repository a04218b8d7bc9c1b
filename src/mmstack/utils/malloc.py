"""Keep freed memory in the process while training on a CPU (glibc's ``mallopt``).

A training step frees and reallocates the same few hundred megabytes of activations every step, in sizes that
change with each batch's padded length. glibc's default policy hands large freed blocks back to the kernel
(its mmap threshold and trim threshold adapt as the process runs), so later steps fault the pages in again:
on the native demo decoder (2 CPU cores) the step slowed from 440 to 520 ms over its first 400 steps, and
with every large block mmapped it took 780 ms. Fixing the mmap threshold at its 32 MiB maximum, never trimming
the heap and growing it in 512 MiB steps keeps the step at 410-435 ms for the whole run (BENCHMARKS.md, session
25), at the price of a resident size that stays at its peak (4-6 GB for that decoder) until the process ends.
The same settings as environment variables (as measured): ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=536870912``.

``keep_freed_memory`` is called by the trainer on a CPU; ``MMSTACK_MALLOC=default`` leaves glibc's policy alone.
It does nothing where the C library is not glibc (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value (64-bit)
NEVER_TRIM = -1  # mallopt(M_TRIM_THRESHOLD, -1) disables trimming
TOP_PAD = 512 * 2**20


@cache
def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse (once per process); True when it was set."""
    if os.environ.get("MMSTACK_MALLOC", "").lower() == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = [
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        mallopt(M_TRIM_THRESHOLD, NEVER_TRIM),
        mallopt(M_TOP_PAD, TOP_PAD),
    ]
    return all(r == 1 for r in done)
