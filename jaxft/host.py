"""Host (CPU) process settings that must be made before JAX starts its threads.

XLA:CPU allocates each step's temporaries (hundreds of MB: activations, logits)
with the C allocator from its worker threads. glibc serves such blocks with a
fresh `mmap` from per-thread arenas and `munmap`s them on free, so every step
page-faults its whole working set again: on a 2-core machine that measured ~2 GB
of page faults and about a third of the LoRA training step
(bench/README.md). Keeping freed memory in one arena removes that cost; the
price is that the process keeps its peak heap, which a training run reaches
in its first step anyway.

One arena is a bad deal for a multi-threaded tokenizer (the Rust `tokenizers`
pool ran 2.5x slower sharing it), so the trainer tunes after tokenising:
threads that exist by then keep their own arenas, and XLA's, started after,
share the main one.
"""

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

OPT_OUT_ENV = "JAXFT_KEEP_MALLOC"


def tune_malloc() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it; True if applied.

    Call after tokenising and before the first JAX computation: threads that already
    exist keep their arenas. A no-op off glibc, or with `JAXFT_KEEP_MALLOC=1`.
    """
    if os.environ.get(OPT_OUT_ENV) == "1" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((_M_ARENA_MAX, 1),  # all threads share the main (sbrk) arena, which can hold big blocks
                (_M_MMAP_MAX, 0),  # never serve a block by its own mmap
                (_M_TRIM_THRESHOLD, 2**31 - 1))  # never give the heap's top back between steps
    applied = all(libc.mallopt(param, value) == 1 for param, value in settings)
    if not applied:
        log.warning("mallopt refused a setting; host allocations keep glibc's defaults")
    return applied
