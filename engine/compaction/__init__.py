"""Compaction: a memory kept within a budget while each class keeps its attention mass
(:mod:`.policies`: merge, reservoir, age, distill)."""

from .policies import (
    POLICIES,
    allocate,
    aside,
    by_class,
    check_options,
    check_request,
    compact,
    merge,
    parse_budget,
    shrink,
)

__all__ = ["POLICIES", "aside", "allocate", "by_class", "check_options", "check_request", "compact", "merge",
           "parse_budget", "shrink"]
