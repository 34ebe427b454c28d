"""Process settings of a training job: glibc's malloc keeps the memory one step frees for the next.

On the CPU every optimizer step frees and re-allocates the same activation and gradient buffers. Under
Lightning's loop glibc gave that memory back to the operating system between steps (heap trimming and
mmap'd chunks) and the next step page-faulted it in again: 2,700-5,800 minor page faults a step on the tiny
model, 176-192 ms a step against 168-175 ms with the thresholds below and one fault a step (three alternating
runs each; BENCHMARKS.md "Per-step overhead"). The same as setting
MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_ in the environment, which wins when set. Called by the job
entry point (`tunelab train`), not by `train(cfg)`: a library call does not change its caller's process.
Accelerator memory is the CUDA caching allocator's and is not affected.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap instead of returning it at 128 KiB
MMAP_THRESHOLD = 32 << 20  # buffers up to 32 MiB (glibc's maximum) come from the heap, reused step to step


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds for a training process; False where there is nothing to set
    (not Linux, another C library, or the environment already chose)."""
    if not sys.platform.startswith("linux") or any(
            name in os.environ for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: no such knob
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
