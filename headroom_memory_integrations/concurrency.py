"""How the writers of one user's memories stay consistent with each other.

Consolidation reads the nearest memories, decides, then writes. Two writers that read before
either writes would both store the same memory. Three mechanisms close that gap:

- In a process, every :class:`~.engine.MemoryStore` of a user on one storage location takes
  the same lock (:func:`user_write_lock`), whichever object, wrapper or thread writes.
- A new memory is stored under an id derived from the user and its wording
  (:func:`wording_id`), so processes adding the same text at once (on a Chroma server, which
  has no locks or transactions) write one record, not several.
- After writing, a store on shared storage looks again at the new memories' neighbours: of two
  memories that say the same thing, written at once by different processes, one is deleted
  (the same one whichever process looks, :func:`survivor`), and only once the other is read
  back stored, so the two are never both deleted.

docs/reliability.md (section 5) gives the guarantees, tests and what remains.
"""

from __future__ import annotations

import hashlib
import threading
import weakref

from .consolidation import same_wording_key
from .types import Memory

_locks: weakref.WeakValueDictionary[tuple[str, str], threading.RLock] = (
    weakref.WeakValueDictionary()
)
_registry_lock = threading.Lock()


def user_write_lock(location: str, user_id: str) -> threading.RLock:
    """The write lock of ``user_id``'s memories at ``location`` (a folder or a server URL),
    shared by every store of that user and location in this process while any holds it.
    Reentrant."""
    key = (location, user_id)
    with _registry_lock:
        lock = _locks.get(key)
        if lock is None:
            lock = threading.RLock()
            _locks[key] = lock
        return lock


def wording_id(user_id: str, text: str) -> str:
    """The id a new memory is stored under: 32 hex digits from the user and the text's
    wording (case, punctuation and spacing ignored), the same in every process."""
    key = f"{user_id}\x00{same_wording_key(text)}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(key).hexdigest()[:32]


def survivor(a: Memory, b: Memory) -> Memory:
    """Of two memories that say the same thing, the one kept: the smaller id. Every process
    picks the same one, whenever it looks: an id never changes (a time would, when two
    processes write the same :func:`wording_id` one after the other)."""
    return a if a.id <= b.id else b
