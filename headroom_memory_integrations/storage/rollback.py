"""Writes larger than one Chroma batch, undone whole even when the process is killed.

Chroma commits each batch of a write on its own (at most 5,461 records in Chroma 1.5), so a
write of more records is several commits. A batch that fails is undone by the writing process
(``ChromaCollection._undo``); a process *killed* between two batches cannot undo anything. So,
before the first batch of such a write to an embedded folder, what undoing it takes is written
next to the folder's other files, durably: :data:`ROLLBACK_FILE`, holding the ids the write
adds and the stored records (text and fields, vector) of those it rewrites. It is removed
once the last batch is stored, or once a failed write has been undone. A process that opens
the folder as its writer and finds it (the last writer was killed halfway) undoes that write
before anything else reads or writes Chroma, then removes it (``ChromaStorage._open_folder``,
and ``ChromaStorage._take_over`` for a process that opened the folder as a reader and then
takes its lock). A write of one batch needs none: Chroma commits it whole.

The record can hold memories' text (the previous versions of those the write rewrites):
it is only there while the write runs, is the owner's alone (0600) and, like the journal of
:mod:`.deferred`, is emptied (truncated, synced) and removed as soon as it is not needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..embeddings.base import Vectors
from ..redaction import logger_without_secrets
from .folder import erase_file, replace_file, sync_folder
from .vectors import vectors_from_text, vectors_to_text

logger = logger_without_secrets(__name__)

ROLLBACK_FILE = ".headroom-memory.rollback"


@dataclass(frozen=True)
class Rollback:
    """How to undo one write to a user's collection: delete ``added``, put back ``prior``
    (id -> ``(document, metadata)`` as Chroma stored them) with their ``vectors`` (one row
    each, in the order of ``prior``)."""

    user_id: str
    dimension: int
    added: list[str]
    prior: dict[str, tuple[str | None, dict[str, Any]]]
    vectors: Vectors

    @classmethod
    def of(
        cls, user_id: str, dimension: int, ids: list[str], prior: dict[str, dict[str, Any]]
    ) -> Rollback:
        """The undo of a write of ``ids`` that rewrites ``prior`` (id -> its stored
        ``document``, ``metadata`` and ``embedding``, as ``ChromaCollection._prior`` reads)."""
        rows = [np.asarray(r["embedding"], dtype=np.float32) for r in prior.values()]
        return cls(
            user_id,
            dimension,
            [i for i in ids if i not in prior],
            {i: (r["document"], dict(r["metadata"] or {})) for i, r in prior.items()},
            np.stack(rows) if rows else np.zeros((0, dimension), dtype=np.float32),
        )

    def to_bytes(self) -> bytes:
        entry = {
            "user_id": self.user_id,
            "dimension": self.dimension,
            "added": self.added,
            "prior": [[i, document, meta] for i, (document, meta) in self.prior.items()],
            "vectors": vectors_to_text(self.vectors),
        }
        return json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Rollback:
        entry = json.loads(data)
        dimension = int(entry["dimension"])
        return cls(
            str(entry["user_id"]),
            dimension,
            [str(i) for i in entry["added"]],
            {str(i): (document, dict(meta)) for i, document, meta in entry["prior"]},
            vectors_from_text(entry["vectors"], dimension),
        )


def keep(folder: Path, rollback: Rollback) -> None:
    """Write ``rollback`` to ``folder`` durably, whole or not at all (written beside, synced,
    renamed over :data:`ROLLBACK_FILE`). Raises OSError; nothing is left then."""
    replace_file(folder / ROLLBACK_FILE, rollback.to_bytes())


def left(folder: Path) -> Rollback | None:
    """The undo a process left in ``folder`` (killed during a write, or its undo failed);
    None if there is none. An unreadable one is logged and removed."""
    erase_file(folder / (ROLLBACK_FILE + ".new"))  # killed while writing it: nothing was written
    try:
        data = (folder / ROLLBACK_FILE).read_bytes()
    except FileNotFoundError:
        return None
    if not data:  # emptied, not yet removed (killed meanwhile): its write is over
        discard(folder)
        return None
    try:
        return Rollback.from_bytes(data)
    except (ValueError, KeyError, TypeError):
        logger.warning("removing the unreadable undo record %s", folder / ROLLBACK_FILE)
        discard(folder)
        return None


def discard(folder: Path) -> None:
    """Empty and remove the undo record of ``folder``, durably (raises OSError)."""
    path = folder / ROLLBACK_FILE
    if erase_file(path):
        sync_folder(folder)
