"""Who is told when a storage is closed: the job queue's writer stops serving the stores
built on it (their background work could not be stored any more), so closing a folder's
storage lets go of the queue file in that folder too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..redaction import logger_without_secrets

logger = logger_without_secrets(__name__)

_listeners: list[Callable[[Any], None]] = []


def when_closed(listener: Callable[[Any], None]) -> None:
    """Call ``listener(storage)`` as each storage starts closing, before it lets go of its
    client, on the closing thread. Registered once per listener (a module's function)."""
    if listener not in _listeners:
        _listeners.append(listener)


def announce_closed(storage: Any) -> None:
    """``storage`` is closing: tell every listener; one that fails is logged, not raised."""
    for listener in list(_listeners):
        try:
            listener(storage)
        except Exception:
            logger.warning("a listener of %r closing failed", storage, exc_info=True)
