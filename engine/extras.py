"""The optional extras: which package comes with which, and the error that names it.

The core install (numpy, faiss-cpu, pyarrow, typer, tqdm) holds memories, answers
queries, persists and serves them. The rest comes in extras:

    fast      numba: compiled kernels of full answers (probs="full"; without it they run as Python)
    nn        torch, pillow, scipy: the Matching Network, training, distillation, image ingest,
              the one-to-one assignment of eval-oneshot --assign
    bench     matplotlib: the benchmarks' plots
    cluster   ray: the sharded memory and bulk ingest
"""

from __future__ import annotations

import importlib

from .errors import MissingExtraError

EXTRA_OF = {"numba": "fast", "torch": "nn", "PIL": "nn", "scipy": "nn", "matplotlib": "bench", "ray": "cluster"}


def missing(module: str, what: str) -> MissingExtraError:
    """The error for ``what`` lacking ``module`` (its top-level package names the extra)."""
    top = module.split(".")[0]
    extra = EXTRA_OF.get(top, "fast,nn,bench,cluster")
    hint = " (for the CPU build of torch, install it first from PyTorch's CPU wheel index)" if top == "torch" else ""
    return MissingExtraError(f"{what} needs {top}, which comes with the '{extra}' extra: "
                             f"pip install 'engine[{extra}]'{hint}")


def require(module: str, what: str):
    """Import ``module``, or raise :class:`MissingExtraError` naming its extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == module.split(".")[0]:
            raise missing(module, what) from None
        raise
