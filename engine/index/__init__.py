"""The vector index: a FAISS index over a memory's slots (:mod:`.vector_index`), the rules
``index="auto"`` follows, and the calibration of its search breadth (:mod:`.calibration`)."""

from .vector_index import (
    AUTO_FLAT_MAX,
    BareSearch,
    SearchSettings,
    VectorIndex,
    auto_nlist,
    auto_spec,
    min_train_points,
    share_k,
    validate_spec,
)

__all__ = ["AUTO_FLAT_MAX", "BareSearch", "SearchSettings", "VectorIndex", "auto_nlist", "auto_spec",
           "min_train_points", "share_k", "validate_spec"]
