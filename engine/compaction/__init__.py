"""Compaction: a memory kept within a budget while each class keeps its attention mass.

:mod:`.policies` (merge, reservoir, age), :mod:`.distill` (merge, then tuned to answer as the
full memory does), :mod:`.budget` (slots in a budget, and their split among classes),
:mod:`.shrink` (a live memory's slots compacted, and its new state built aside).
"""

from ..options import POLICIES, parse_budget
from .budget import allocate
from .distill import check_options
from .policies import by_class, compact, merge
from .shrink import aside, check_request, shrink

__all__ = ["POLICIES", "aside", "allocate", "by_class", "check_options", "check_request", "compact", "merge",
           "parse_budget", "shrink"]
