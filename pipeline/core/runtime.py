"""Process-wide settings for inference.

`freeze_long_lived_objects` moves everything alive once the models are loaded (modules, torch and
MONAI internals: hundreds of thousands of objects) out of the cyclic garbage collector's sight.
Each of its full collections had to walk them all, at random points of a series (reading a series
creates tens of thousands of pydicom objects, which triggers them).

`keep_freed_memory` tells glibc's malloc to keep freed memory for reuse. By default glibc hands
every allocation above a (dynamic) threshold back to the kernel when it is freed and trims the top
of the heap, so the next UNet activation or the next CT volume is a fresh mapping whose pages
fault in and are zeroed one by one: a large part of inference on a small CPU (bench/bench_infer.py,
with the same settings given as MALLOC_* environment variables for comparison). Training does not
use it: a bare training step was faster with it, but the demo's epochs were not. Intel's PyTorch
CPU tuning guide gets the same effect by preloading jemalloc or tcmalloc; `mallopt` does it from
inside the process, with the C library we already have. Elsewhere than glibc (macOS, musl) it
does nothing.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import sys

log = logging.getLogger(__name__)

# glibc <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

SETTINGS = (
    (M_MMAP_THRESHOLD, 32 << 20),  # glibc's maximum: blocks up to 32 MB come from the reusable heap
    (M_TRIM_THRESHOLD, 1 << 30),   # give memory back to the kernel only above 1 GB of free heap top
    (M_TOP_PAD, 256 << 20),        # grow the heap in 256 MB steps
)

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Apply SETTINGS through glibc's mallopt once per process; True if they are in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _done = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    log.debug("malloc keeps freed memory: %s", _done)
    return _done


def freeze_long_lived_objects() -> None:
    """gc.freeze(): objects alive now are never scanned again by the cyclic collector (they stay
    alive as long as they are referenced, as before)."""
    gc.collect()
    gc.freeze()
