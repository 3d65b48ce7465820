"""Freed memory kept for the next training step (glibc malloc, CPU training).

glibc hands every block over its mmap threshold (128 KB, raised up to 32 MB as such blocks are freed) back to the
kernel as soon as it is freed. A training step on the CPU allocates the same large tensors every step (the
word-embedding gradient alone is vocabulary × hidden floats, autocast's bf16 copies of the weights, activations), so
each step gets them back as fresh pages: tens of thousands of page faults, each page zero-filled by the kernel, before
torch fills it again. With a large mmap threshold and trim threshold, freed blocks stay in the heap and the next
step reuses them; peak memory is the same, it is simply not returned to the system between steps. What it saves on
a whole `tunepipe train` is measured by benchmarks/heap_reuse.py (results/heap_reuse.json).

Done only where `tunepipe train` is the process (the console script, `python -m tunepipe`; not a caller's
main()), only with glibc, and never over the user's own choice: MALLOC_* or GLIBC_TUNABLES malloc settings, or
another allocator in LD_PRELOAD (jemalloc, tcmalloc, mimalloc), leave malloc as it is. TUNEPIPE_HEAP_REUSE=0 turns
it off."""
from __future__ import annotations

import ctypes
import os

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap: a 250k-token vocabulary × 1,024 floats fits
TRIM_THRESHOLD = (1 << 31) - 1  # the heap's free top is kept (mallopt takes an int)

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def is_glibc() -> bool:
    """Asked of the C library itself (platform.libc_ver() would read the whole python executable)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr, or a C library without that name
        return False


def why_not() -> str | None:
    """Why the heap is left as it is in this process, or None when reuse applies."""
    env = os.environ
    if env.get("TUNEPIPE_HEAP_REUSE", "1").strip().lower() in ("0", "false", "no", "off"):
        return "TUNEPIPE_HEAP_REUSE=0"
    if not is_glibc():
        return "not glibc"
    if any(name in env for name in _USER_SETTINGS) or "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        return "malloc settings of the user's"
    if any(name in env.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS):
        return "another allocator is preloaded"
    return None


def reuse_freed_memory() -> bool:
    """Keep freed blocks in the heap (module docstring); True when the settings were applied."""
    if why_not() is not None:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                        TRIM_THRESHOLD))
