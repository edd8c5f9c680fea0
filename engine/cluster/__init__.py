"""Scale-out on Ray: a memory split over shards, with the verbs of :class:`engine.Memory`.

Importing :mod:`engine` never imports Ray; this package needs the ``cluster`` extra
(``pip install 'engine[cluster]'``).
"""

from .merge import merge
from .sharded import ShardedMemory, ShardUnavailableError, connect

__all__ = ["ShardUnavailableError", "ShardedMemory", "connect", "merge"]
