"""What a memory measures on its own slots as they change: the softmax temperature
(:mod:`.temperature`) and, through the index, its search breadth (:mod:`.upkeep`)."""

from . import temperature
from .upkeep import Tuning

__all__ = ["Tuning", "temperature"]
