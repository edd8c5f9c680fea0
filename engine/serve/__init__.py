"""Serving memories to other processes over Apache Arrow Flight: server and client."""

from .client import Client
from .server import MemoryServer

__all__ = ["Client", "MemoryServer"]
