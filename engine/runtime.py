"""How a process that trains or embeds with torch is set up: an allocator that keeps the
memory it frees, and (set before Python starts) OpenMP threads that sleep while they wait.

Two costs of torch on a small CPU machine, measured on 2 cores with
``python bench/torch_runtime.py`` (docs/matching-networks.md, "The process a model runs in"):

- **Page faults.** A convolution's activations for 128 images are about 26 MB at 28x28
  and 52 MB at 40x40. glibc hands blocks that large out by ``mmap`` and gives them back on
  free, so every batch faults its memory in again: inference spent more time in the kernel
  than in torch. :func:`prepare` has every block come from the heap (``mmap`` is off for
  allocations: glibc's largest threshold, 32 MB, is below a 40x40 batch) and keeps freed
  memory in the process (``mallopt``); it can be called at any time. glibc still maps
  memory when the heap cannot grow, and for thread arenas' blocks beyond their 64 MB heaps.
- **Spinning threads.** OpenMP threads spin while they wait for work; beside another busy
  process they burn the cores it needs. ``OMP_WAIT_POLICY=PASSIVE`` stops that, but OpenMP
  reads it once, when a runtime loads, and ``import engine`` loads FAISS's: set from Python
  after that, it does not reach torch's threads. So it belongs in the environment the process starts
  with: ``make demo`` sets it, and ``make bench`` for the benchmarks that train.

The library never calls :func:`prepare` on import: it changes the whole process. The demo,
``engine train`` and ``eval-*``, and the learner benchmarks call it first.
"""

from __future__ import annotations

import ctypes
import os
import sys

from .checks import optional_integer
from .extras import require

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit: blocks below it come from the heap
MMAP_MAX = 0  # blocks glibc may map at once: none, so larger blocks come from the heap too
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap's top before it is given back
TOP_PAD = 64 << 20  # extra asked of the kernel each time the heap grows


def prepare(threads: int | None = None) -> dict:
    """Set this process's allocator up for torch work (see the module); safe to call again.

    The process then keeps up to ``TRIM_THRESHOLD`` (1 GiB) of freed heap rather than
    giving it back, which suits a training or embedding job, not a long-lived server.

    Args:
        threads: torch's intra-op threads (default: torch's own choice, the cores).

    Returns:
        {"malloc": True when glibc took the settings (False elsewhere: nothing to tune),
        "omp_wait_policy": the OpenMP wait policy of the environment (None: spinning),
        "threads": torch's thread count, when ``threads`` was given}.

    Raises:
        InvalidValueError: ``threads`` is not an integer >= 1 (nothing is changed).
    """
    threads = optional_integer("threads", threads)
    out: dict = {"malloc": _tune_malloc(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if threads is not None:
        torch = require("torch", "setting torch's threads")

        torch.set_num_threads(threads)
        out["threads"] = torch.get_num_threads()
    return out


def _tune_malloc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:  # the process's own symbols: the C library it runs on, no search of the disk
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    took = [mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_MMAP_MAX, MMAP_MAX),
                                             (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))]
    return all(took)  # each one tried, whatever the others gave
