"""Bulk creation of many small Python objects without the cyclic garbage collector.

Splitting a corpus into a million word lists creates containers fast enough to trigger
many generation-0 collections, and every few of those a full one that rescans every live
object (the whole corpus in memory). None of these objects can form a cycle, so pausing
the collector for the duration is safe, and it makes such steps several times faster.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused_gc"]


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector inside the block; restore its previous state after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
