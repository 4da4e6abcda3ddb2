"""Process-wide settings for inference.

`freeze_long_lived_objects` moves everything alive once the models are loaded (modules, torch and
MONAI internals: ~300 K objects) out of the cyclic garbage collector's sight. Each of its full
collections had to walk them all: 0.14 s, at random points of a series (one in about four real
CT series; reading a series creates tens of thousands of pydicom objects, which triggers them).

`keep_freed_memory` tells glibc's malloc to keep freed memory for reuse. By default glibc hands
every allocation above a (dynamic) threshold back to the kernel when it is freed and trims the top
of the heap, so the next UNet activation or the next 80 MB CT volume is a fresh mapping whose pages
fault in and are zeroed one by one. On this project's 2-core CPU that cost a fifth of inference.
Two runs of bench/bench_infer.py (real CT series, 5-fold ensemble, bf16), one with
`MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=268435456` in
the environment: end to end 0.98 vs 1.21 s, the bare forward passes 0.74 vs 0.87 s, peak RSS 791
vs 934 MB. Training does not use it: a bare training step (UNet, batch 16 at 128x128, bf16) was
8% faster with it (0.142 vs 0.154 s, 0.157 vs 0.170 s in alternated runs), but the demo's epochs
were not (median 2.9 s per epoch with and without). Intel's PyTorch CPU tuning guide gets the same effect by
preloading jemalloc or tcmalloc; `mallopt` does it from inside the process, with the C library we
already have. Elsewhere than glibc (macOS, musl) it does nothing.
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
