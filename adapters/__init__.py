"""keymgmt.adapters: everything that touches the world around the sans-I/O core.

For now: the in-memory adapter (:mod:`keymgmt.adapters.memory`), used by tests,
property-based harnesses and embedders who move the bytes themselves.
"""

from .memory import Delivery, InMemoryPair, MemoryServerApp

__all__ = ["Delivery", "InMemoryPair", "MemoryServerApp"]
