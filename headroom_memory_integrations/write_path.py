"""The write path of :class:`~.engine.MemoryStore`: new memories consolidated with the user's
stored ones and written, holding the user's write lock.

Each new memory is compared with its nearest stored memories and the batch's earlier items, word
by word (:func:`.consolidation.relate`): it says nothing new (a duplicate: nothing is written),
it changes one of them (it supersedes it, whose old text goes to ``history``), or it is stored
beside them. One that names the memory it ``replaces`` supersedes that memory. Every item takes
effect in its place in the batch: an earlier item never undoes a later one. With storage that
other processes write too (a Chroma server), what they wrote meanwhile is settled after the
write (:meth:`WritePath._reconcile`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from typing import Any

import numpy as np

from .concurrency import survivor, wording_id
from .consolidation import Relation, relate, same_wording, same_wording_key
from .embeddings.base import Vectors
from .errors import HeadroomMemoryError
from .redaction import logger_without_secrets
from .storage.base import Catalogued, Storage, UserCollection
from .storage.vectors import most_similar, one_blas_thread
from .types import Category, Memory, Revision, utc_now

logger = logger_without_secrets(__name__)

CONSOLIDATION_NEIGHBOURS = 5
"""How many of the nearest existing memories a new one is compared with."""

CONSOLIDATION_MIN_SIMILARITY = 0.3
"""Existing memories less similar (cosine) than this are not compared with a new one: it is
stored beside them. Short texts with a name or a state changed embed far apart ("Reports to
Maria Lopez" ~ "Reports to James Chen" 0.40, "Works at Deloitte" ~ "Works at KPMG" 0.396, "Is
single" ~ "Is dating someone named Alex" 0.378), so the floor is low; the word-by-word
comparison decides (at 0.4, the two last were stored beside the memory they correct; 0.3 to
0.4 changed no other outcome of the benchmark's pairs, LoCoMo's conversations or the
synthetic corpus)."""

_READ_CHUNK = 1000  # ids or vectors per storage read when consolidating a large batch
_SIMILARITY_BLOCK = 256  # rows of a batch compared with the earlier ones in one matrix product
_EARLIER_KEPT = 64
"""Earlier items of a batch an item is compared with, at most: the most similar, of which the
:data:`CONSOLIDATION_NEIGHBOURS` nearest still current are judged. Were more of them
duplicates or superseded, a nearer current one could be missed: the item is then stored beside
it, never dropped."""


class Outcome(str, Enum):
    """What :meth:`MemoryStore.remember` did with a new memory."""

    STORED = "stored"
    """It was new: stored as a memory of its own."""
    DUPLICATE = "duplicate"
    """It said nothing new: nothing was written, and the existing memory is returned. (A
    memory that would update a stored one changed after it was said, or, imported, after it
    was last changed, is a duplicate too: it is outdated.)"""
    SUPERSEDED = "superseded"
    """It changed an existing memory ("daughter is 7" -> "9"): that memory now has the new
    text, and its old text is the last entry of its ``history``."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Remembered:
    """One result of :meth:`MemoryStore.remember`: the memory now current, and what happened.

    Example::

        >>> store.remember("User's daughter is 7 years old").outcome
        <Outcome.STORED: 'stored'>
        >>> done = store.remember("User's daughter is 9 years old")
        >>> done.outcome, done.memory.text, done.memory.history[-1].text
        (<Outcome.SUPERSEDED: 'superseded'>, "User's daughter is 9 years old",
         "User's daughter is 7 years old")
    """

    memory: Memory
    outcome: Outcome


@dataclass(frozen=True)
class _Decision:
    """How one item of a batch is consolidated: its outcome, and the memory it concerns (its
    own draft, or the id of the memory it duplicates or supersedes)."""

    outcome: Outcome
    target: str
    checked_text: str | None = None  # the stored text it was judged against (catalog copy)
    named: bool = False  # the item named the memory it supersedes (``replaces``)


class WritePath:
    """:class:`~.engine.MemoryStore`'s write path, as a base class: what it needs of the store
    is declared here, and the store provides it."""

    storage: Storage
    duplicate_threshold: float | None
    _write_lock: threading.RLock

    def _open(self, dimension: int | None = None) -> UserCollection:
        raise NotImplementedError

    def _embed(self, texts: Sequence[str]) -> Vectors:
        raise NotImplementedError

    def _vectors(self, memories: Sequence[Memory]) -> Vectors:
        raise NotImplementedError

    def _restore(self, memories: Sequence[Memory], vectors: Vectors) -> list[Remembered]:
        """Write exported ``memories`` as they are, by id, in one write: none is consolidated
        with another (the import of a key-value store's items, or of a backup). A memory whose
        id is held here by one updated as late or later is ``duplicate`` (the store knows as
        much or better: see :func:`_known_better`); by an older one, ``superseded`` (it takes
        the imported text, the old one joining its history); else ``stored`` with its id."""
        collection = self._open(vectors.shape[1])
        with self._write_lock:
            now = utc_now()
            held = {m.id: m for m in _get_in_chunks(collection, [m.id for m in memories])}
            written: dict[str, Memory] = {}  # what this import writes, by id
            row_of: dict[str, int] = {}  # id -> the row of the memory and vector it writes
            results = []
            for row, memory in enumerate(memories):
                current = written.get(memory.id) or held.get(memory.id)
                if current is None:
                    written[memory.id], row_of[memory.id] = memory, row
                    results.append(Remembered(memory, Outcome.STORED))
                elif _known_better(current, memory, now):
                    results.append(Remembered(current, Outcome.DUPLICATE))
                else:
                    revised = _revised(current, memory, at=memory.updated_at)
                    written[memory.id], row_of[memory.id] = revised, row
                    results.append(Remembered(revised, Outcome.SUPERSEDED))
            # one deleted meanwhile by another process: its line is stored as it is, on its own
            _write_batch(
                collection,
                written,
                row_of,
                vectors,
                results,
                rewrites=written.keys() & held.keys(),
                instead=lambda row: memories[row],
                others_outdated=True,
            )
        return results

    def _remember(
        self,
        drafts: Sequence[Memory],
        vectors: Vectors,
        wanted: Sequence[str],
        replaces: Mapping[int, str],
        *,
        imported: bool,
        dated: bool = False,
    ) -> list[Remembered]:
        """Consolidate ``drafts`` (each with a placeholder id of its own) with the stored
        memories and write the outcome, holding the user's write lock: the write path of
        :meth:`~.engine.MemoryStore.remember_many` and :meth:`~.engine.MemoryStore.import_`.

        Args:
            wanted: The id each draft is stored under if it is new (see :meth:`_apply`).
            replaces: Draft index -> the id of the memory it explicitly supersedes. It does
                so in its place in the batch, like every other item: the earlier items are
                judged against the memory's text before, the later ones after.
            imported: The drafts are exported memories: their times and history are kept,
                and one that updates a newer memory is outdated (see
                :meth:`~.engine.MemoryStore.import_`).
            dated: The drafts carry the time they were said (``remember_many``'s
                ``said_at``): it is kept, and one that updates a newer memory is outdated.
        """
        dated = dated or imported
        collection = self._open(vectors.shape[1])
        with self._write_lock:
            named = {m.id: m for m in _get_in_chunks(collection, list(replaces.values()))}
            decisions, seen = self._consolidate(collection, drafts, vectors, replaces, named, dated)
            results = self._apply(collection, drafts, vectors, wanted, decisions, imported, dated)
            if self._shared_with_other_processes():
                try:
                    results = self._reconcile(collection, drafts, vectors, decisions, results, seen)
                except HeadroomMemoryError as exc:  # the write itself succeeded
                    logger.warning(
                        "could not check for writes made meanwhile by another process: %s", exc
                    )
            return results

    def _shared_with_other_processes(self) -> bool:
        """Whether other processes may write this user's memories meanwhile: not with an
        embedded folder, which one process at a time writes to (it holds the folder's lock)."""
        return getattr(self.storage, "folder", None) is None

    def _consolidate(
        self,
        collection: UserCollection,
        drafts: Sequence[Memory],
        vectors: Vectors,
        replaces: Mapping[int, str],
        named: Mapping[str, Memory],
        dated: bool = False,
    ) -> tuple[list[_Decision], dict[str, str]]:
        """Decide, item by item, what each draft does, comparing it with its nearest stored
        memories and the batch's earlier items. Reads texts only (whole records for ``dated``
        drafts, whose times count: see :meth:`_remember`): one nearest-neighbour query and one
        read per :data:`_READ_CHUNK` items.

        An item that ``replaces`` a memory (one of ``named``, read already) supersedes it in
        its place in the batch: the items before it are judged against the memory's old text,
        the items after it against its new one. Unless the memory is not there, or the draft
        is ``dated`` and the memory changed after it was said: it is outdated, a duplicate
        of the memory (never stored beside it, whatever its wording).

        Returns:
            The decisions, and the text of every stored memory they were made against (by id).
        """
        neighbours = _nearest_in_chunks(collection, vectors, CONSOLIDATION_NEIGHBOURS)
        floor = CONSOLIDATION_MIN_SIMILARITY
        close = [i for row in neighbours for i, cosine in row if cosine >= floor]
        changed: dict[str, datetime] | None = None  # id -> updated_at, for dated drafts
        if dated:
            records = _get_in_chunks(collection, close)
            catalog = {m.id: Catalogued(m.text, m.category, m.keys) for m in records}
            now = utc_now()  # a memory changed later than now has no known order: left out
            changed = {
                m.id: m.updated_at for m in [*named.values(), *records] if m.updated_at <= now
            }
        else:
            catalog = _catalog_in_chunks(collection, close)
        texts: dict[str, str] = {}  # id -> text, for memories this batch creates or rewrites
        vector_of: dict[str, int] = {}  # id -> the batch row holding its (new) vector
        owner_of: dict[int, str] = {}  # batch row -> the id whose vector it is
        owns = np.zeros(len(drafts), dtype=bool)  # the rows in owner_of
        earlier = _earlier_neighbours(vectors, floor)
        decisions: list[_Decision] = []
        for index, (draft, row) in enumerate(zip(drafts, neighbours)):
            target = replaces.get(index)
            if target is not None and target in named and not _outdated(draft, target, changed):
                decision = _Decision(Outcome.SUPERSEDED, target, named=True)
            elif target is not None and target in named:
                # said before the memory it replaces changed: the store knows better (a turn
                # retried after the user's next one, shown that one's correction). Judged by
                # similarity, a dissimilar wording ("Works at Acme" for "Works as a
                # freelancer") was stored beside it: the corrected fact current again.
                decision = _Decision(Outcome.DUPLICATE, target, named=True)
            else:
                found = [
                    (cosine, memory_id, catalog[memory_id].text, catalog[memory_id].keys)
                    for memory_id, cosine in row
                    if memory_id not in texts and cosine >= floor and memory_id in catalog
                ]
                if owner_of:  # the nearest earlier items still current (stored or superseding)
                    rows, similar = earlier[index]
                    current = owns[rows]
                    kept = zip(rows[current].tolist(), similar[current].tolist())
                    for position, cosine in list(kept)[:CONSOLIDATION_NEIGHBOURS]:
                        memory_id = owner_of[position]
                        found.append((cosine, memory_id, texts[memory_id], drafts[position].keys))
                found.sort(key=lambda candidate: candidate[0], reverse=True)
                decision = self._judge(draft, found[:CONSOLIDATION_NEIGHBOURS], changed)
            if decision.outcome is Outcome.SUPERSEDED and decision.target in vector_of:
                replaced = vector_of[decision.target]
                owner_of.pop(replaced, None)
                owns[replaced] = False
            if decision.outcome is not Outcome.DUPLICATE:
                texts[decision.target] = draft.text
                vector_of[decision.target] = index
                owner_of[index] = decision.target
                owns[index] = True
                if changed is not None:
                    changed[decision.target] = draft.updated_at
            decisions.append(decision)
        return decisions, {memory_id: entry.text for memory_id, entry in catalog.items()}

    def _judge(
        self,
        draft: Memory,
        candidates: Sequence[tuple[float, str, str, tuple[str, ...]]],
        changed: Mapping[str, datetime] | None = None,
    ) -> _Decision:
        """The draft's outcome against ``candidates`` (similarity, id, text, keys), most similar
        first: a duplicate of any of them, else an update of the most similar one it updates,
        else stored. With ``changed`` (the candidates' ``updated_at``, for dated drafts), an
        update of a memory changed after the draft is outdated: a duplicate. (A memory changed
        at a time still to come, written while the clock ran ahead, is not in ``changed``: its
        order with the draft is unknown, and the update is made.)"""
        update: _Decision | None = None
        for similarity, memory_id, text, keys in candidates:
            relation = self._relation(text, draft.text, similarity, keyed=bool(keys or draft.keys))
            if relation is Relation.UPDATE and _outdated(draft, memory_id, changed):
                relation = Relation.DUPLICATE  # the store already knows better
            if relation is Relation.DUPLICATE:
                return _Decision(Outcome.DUPLICATE, memory_id, text)
            if relation is Relation.UPDATE and update is None:
                update = _Decision(Outcome.SUPERSEDED, memory_id, text)
        return update or _Decision(Outcome.STORED, draft.id)

    def _relation(self, old: str, new: str, similarity: float, *, keyed: bool) -> Relation:
        """How ``new`` relates to ``old`` under this store's consolidation setting (with it
        off, only the same wording is a duplicate). ``similarity`` is that of the stored
        vectors, which hold a memory's keys too (``keyed``: either memory has keys): then,
        where a rewording is judged, the texts' own similarity is used (keys written in two
        conversations differ, and put "Deploys with Docker" and "Deploys using Docker" only
        ~0.5 apart, where the texts are 0.99). Without keys, ``similarity`` already is the
        texts' own."""
        if self.duplicate_threshold is None:
            return Relation.DUPLICATE if same_wording(old, new) else Relation.DISTINCT
        return relate(
            old,
            new,
            similarity,
            duplicate_threshold=self.duplicate_threshold,
            text_similarity=(lambda: self._text_similarity(old, new)) if keyed else None,
        )

    def _text_similarity(self, old: str, new: str) -> float:
        """The cosine similarity of two memory texts alone (without their keys)."""
        vectors = self._embed([old, new])
        return float(vectors[0] @ vectors[1])

    def _apply(
        self,
        collection: UserCollection,
        drafts: Sequence[Memory],
        vectors: Vectors,
        wanted: Sequence[str],
        decisions: Sequence[_Decision],
        imported: bool,
        dated: bool,
    ) -> list[Remembered]:
        """Carry out the decisions: read afresh the stored memories they concern and the ids
        the new ones want (one read), build the new and rewritten memories, and write them all
        at once.

        A new memory is stored under its wanted id (:func:`.concurrency.wording_id`, or an
        imported memory's own id) unless a stored memory holds that id. The memory holding an
        imported memory's id is another version of the same memory if the id names it (see
        :func:`_same_memory`) or the consolidation found that it updates it: the imported one
        supersedes it unless it is outdated (:func:`_known_better`: a duplicate). Else the
        imported one is a memory of its own, stored under its placeholder id. A wording id
        names a wording, not a memory: a new text worded as one a memory had before it was
        updated is a memory of its own, and takes its placeholder id, unless the memory still
        has that wording (another process just wrote it: a duplicate).

        An update dated earlier than the memory it updates changed is outdated: a duplicate
        (unless the memory changed later than now, while the clock ran ahead)."""
        now = utc_now()
        final: dict[str, str] = {}  # placeholder id of a draft -> the id it is stored under
        targets = {d.target for d in decisions} - {d.id for d in drafts}
        probes = {
            wanted[index]
            for index, decision in enumerate(decisions)
            if decision.outcome is Outcome.STORED
        }
        stored = {m.id: m for m in _get_in_chunks(collection, list(targets | probes))}
        current: dict[str, Memory] = {}  # what this batch writes, by id
        row_of: dict[str, int] = {}
        results: list[Remembered] = []
        for index, (draft, decision) in enumerate(zip(drafts, decisions)):
            target = final.get(decision.target, decision.target)
            existing = current.get(target) or stored.get(target)
            if decision.outcome is not Outcome.STORED and not _still_applies(
                decision, existing, draft, self.duplicate_threshold
            ):
                decision = _Decision(Outcome.STORED, draft.id)  # it changed meanwhile
            if decision.outcome is Outcome.SUPERSEDED:
                assert existing is not None
                if imported and existing.id == wanted[index]:  # its update: another version
                    outdated = _known_better(existing, draft, now)
                else:
                    outdated = dated and draft.updated_at < existing.updated_at <= now
                if outdated:  # the store knows better
                    decision = _Decision(Outcome.DUPLICATE, target, named=decision.named)
            memory_id = draft.id
            if decision.outcome is Outcome.STORED:
                holder = current.get(wanted[index]) or stored.get(wanted[index])
                if holder is None:
                    memory_id = wanted[index]
                elif imported and _same_memory(holder, draft):  # another version of it
                    outdated = same_wording(holder.text, draft.text) or _known_better(
                        holder, draft, now
                    )
                    existing = holder
                    decision = _Decision(
                        Outcome.DUPLICATE if outdated else Outcome.SUPERSEDED, holder.id
                    )
                    final[draft.id] = holder.id  # later items that matched this draft
                elif wanted[index] not in current and same_wording(holder.text, draft.text):
                    existing, decision = holder, _Decision(Outcome.DUPLICATE, holder.id)
                    final[draft.id] = holder.id  # later items that matched this draft
            if decision.outcome is Outcome.DUPLICATE:
                assert existing is not None
                # a restatement brings the keys it lacked (an outdated replace is none)
                if draft.keys and not existing.keys and not decision.named:
                    existing = replace(existing, keys=draft.keys)
                    current[existing.id] = existing
                    row_of[existing.id] = index  # indexed as the restatement with its keys
                results.append(Remembered(existing, Outcome.DUPLICATE))
                continue
            if decision.outcome is Outcome.SUPERSEDED and decision.named:
                assert existing is not None  # as MemoryStore.update would rewrite it
                memory = rewritten(
                    existing,
                    draft.text,
                    draft.category,
                    None,
                    draft.keys,
                    at=draft.updated_at if dated else None,
                )
                if memory is existing:  # the same again: nothing to write
                    results.append(Remembered(existing, Outcome.SUPERSEDED))
                    continue
            elif decision.outcome is Outcome.SUPERSEDED:
                assert existing is not None
                memory = _revised(existing, draft, at=draft.updated_at if dated else None)
            else:
                memory = replace(draft, id=memory_id)
                if not dated:  # a new memory is dated when it is written
                    now = utc_now()
                    memory = replace(memory, created_at=now, updated_at=now)
                final[draft.id] = memory_id
            current[memory.id] = memory
            row_of[memory.id] = index
            results.append(Remembered(memory, decision.outcome))
        # one deleted meanwhile by another process: what its draft says is new, and is stored
        # as a new memory, under the draft's placeholder id
        _write_batch(
            collection,
            current,
            row_of,
            vectors,
            results,
            rewrites=current.keys() & stored.keys(),
            instead=lambda row: drafts[row] if dated else _dated_now(drafts[row]),
            behind=not imported,
        )
        return results

    def _reconcile(
        self,
        collection: UserCollection,
        drafts: Sequence[Memory],
        vectors: Vectors,
        decisions: Sequence[_Decision],
        results: list[Remembered],
        seen: Mapping[str, str],
    ) -> list[Remembered]:
        """After writing to storage that other processes write too: settle what they wrote
        meanwhile (between this batch's reads and its write), which the decisions could not
        see. Every read here is fresh.

        - A new memory and one written meanwhile that say the same thing: the one that adds
          nothing to the other is deleted (if each adds nothing, the one that is not the
          :func:`.concurrency.survivor`), by whichever process sees both. A memory is deleted
          only while the other is read back stored, and never one with a history, so the two
          are never both deleted.
        - A memory this batch superseded whose text another process replaced meanwhile, with
          no trace of this batch's text: this batch's text is added to its history.

        Raises:
            HeadroomMemoryError: A storage call failed; the caller logs it (the write itself
                succeeded).
        """
        written = {done.memory.id for done in results if done.outcome is not Outcome.DUPLICATE}
        new = [i for i, done in enumerate(results) if done.outcome is Outcome.STORED]
        superseding = [i for i, done in enumerate(results) if done.outcome is Outcome.SUPERSEDED]
        if not new and not superseding:
            return results
        floor = CONSOLIDATION_MIN_SIMILARITY
        limit = CONSOLIDATION_NEIGHBOURS + 1  # the new memory itself is one of them
        rows = _nearest_in_chunks(collection, vectors[new], limit) if new else []
        # A memory that was there when a draft was judged is settled, unless that judgement
        # fell through (the memory it duplicated was gone when written, so it was stored).
        judged = written | seen.keys()
        fell_through = {i for i in new if decisions[i].outcome is not Outcome.STORED}
        meanwhile = [  # near a new memory, and not judged with it
            [
                (i, cosine)
                for i, cosine in row
                if cosine >= floor and i not in (written if index in fell_through else judged)
            ]
            for index, row in zip(new, rows)
        ]
        others = {memory_id for row in meanwhile for memory_id, _ in row}
        if not others and not superseding:
            return results  # the common case: nobody else wrote near these memories
        mine = {results[i].memory.id for i, row in zip(new, meanwhile) if row}
        mine |= {results[i].memory.id for i in superseding}
        fresh = {m.id: m for m in _get_in_chunks(collection, list(others | mine))}
        results = list(results)
        gone: set[str] = set()
        for index, row in zip(new, meanwhile):
            written_now = results[index].memory
            stored = fresh.get(written_now.id)
            if stored is None and row:  # another process settled it already: say for what
                results[index] = self._duplicate_among(written_now, row, fresh) or results[index]
            if stored is None or stored.text != written_now.text:
                continue  # nothing to settle, or deleted or changed meanwhile: leave it
            for memory_id, cosine in row:
                other = fresh.get(memory_id)
                if other is None or memory_id in gone:
                    continue
                loser = self._redundant(stored, other, cosine)
                if loser is None:
                    continue
                collection.delete([loser.id])
                gone.add(loser.id)
                if loser is stored:
                    results[index] = Remembered(other, Outcome.DUPLICATE)
                    break
        for index in superseding:
            self._keep_overwritten_text(collection, drafts[index], results, index, fresh)
        return results

    def _duplicate_among(
        self, memory: Memory, row: Sequence[tuple[str, float]], fresh: Mapping[str, Memory]
    ) -> Remembered | None:
        """``memory`` as a duplicate of the first of ``row``'s memories it duplicates."""
        for memory_id, cosine in row:
            other = fresh.get(memory_id)
            if other is not None and (
                self._relation(other.text, memory.text, cosine, keyed=_keyed(other, memory))
                is Relation.DUPLICATE
            ):
                return Remembered(other, Outcome.DUPLICATE)
        return None

    def _redundant(self, mine: Memory, other: Memory, cosine: float) -> Memory | None:
        """Which of two memories (read back stored) may be deleted: one that adds nothing to
        the other (a duplicate of it), has no history, and, if each is a duplicate of the
        other, is not the :func:`.concurrency.survivor`. None if both are kept."""
        keyed = _keyed(mine, other)

        def adds(old: Memory, new: Memory) -> bool:
            return self._relation(old.text, new.text, cosine, keyed=keyed) is not Relation.DUPLICATE

        mine_adds, other_adds = adds(other, mine), adds(mine, other)
        if mine_adds and other_adds:
            return None
        if mine_adds:
            loser = other
        elif other_adds:
            loser = mine
        else:
            loser = other if survivor(mine, other) is mine else mine
        return None if loser.history else loser

    def _keep_overwritten_text(
        self,
        collection: UserCollection,
        draft: Memory,
        results: list[Remembered],
        index: int,
        fresh: Mapping[str, Memory],
    ) -> None:
        """If another process overwrote the memory this batch just superseded, with no trace
        of this batch's text, add that text to its history (its newest earlier version)."""
        now = fresh.get(results[index].memory.id)
        if now is None or draft.text in {now.text, *(r.text for r in now.history)}:
            return  # deleted since, or this text is kept
        # it stopped being current when the other text was written over it
        kept = replace(
            now, history=(*now.history, Revision(draft.text, draft.category, now.updated_at))
        )
        if not write_unless_deleted(collection, [kept], self._vectors([kept]), {kept.id}):
            results[index] = Remembered(kept, Outcome.SUPERSEDED)  # (deleted since: it stays so)


def write_unless_deleted(
    collection: UserCollection,
    memories: Sequence[Memory],
    vectors: Vectors,
    rewrites: Collection[str],
    instead: Callable[[str], Memory | None] = lambda memory_id: None,
    *,
    behind: bool = False,
) -> dict[str, Memory | None]:
    """Write ``memories`` in one write, of which ``rewrites`` name those that are new versions
    of memories the caller read stored: the rule of every such write. One that another
    process deleted after it was read stays deleted (the delete wins): its new version is not
    written, nor the deleted text in a history. In its place the memory ``instead`` gives
    for its id (what the caller meant to say, as a new memory), if any, is stored with the
    new version's vector, by a second write after the first: if that one fails, this raises
    with the first stored (Chroma has no transaction to make both one; see
    docs/reliability.md, section 5).

    Args:
        behind: The first write may reach storage just after this returns (see
            :meth:`~.storage.base.UserCollection.rewrite`).

    Returns:
        The ids of the rewrites deleted meanwhile, each with the memory stored in its place
        (None: nothing was).
    """
    gone = collection.rewrite(memories, vectors, rewrites=rewrites, behind=behind)
    replaced = {memory_id: instead(memory_id) for memory_id in gone}
    stored = {memory_id: m for memory_id, m in replaced.items() if m is not None}
    if stored:
        row_of = {m.id: row for row, m in enumerate(memories)}
        collection.upsert(list(stored.values()), vectors[[row_of[i] for i in stored]])
    return replaced


def _write_batch(
    collection: UserCollection,
    written: Mapping[str, Memory],
    row_of: Mapping[str, int],
    vectors: Vectors,
    results: list[Remembered],
    *,
    rewrites: Collection[str],
    instead: Callable[[int], Memory],
    behind: bool = False,
    others_outdated: bool = False,
) -> None:
    """Write what a batch wrote (``written``, by id, each with the row of its vector and of
    the result of the item that wrote it last in ``row_of``), with
    :func:`write_unless_deleted`. A rewrite of a memory deleted meanwhile is replaced by
    ``instead(its row)``, and every result that named the deleted memory names that one:
    ``stored`` for the item that wrote it; for any other, ``duplicate`` if
    ``others_outdated`` (a restore: the line stored outdates the others of its id, whose
    texts are not kept), else what it was (the memory it duplicated or superseded is now
    that one)."""
    if not written:
        return
    rows = [row_of[i] for i in written]
    replaced = write_unless_deleted(
        collection,
        list(written.values()),
        vectors[rows],
        rewrites,
        lambda memory_id: instead(row_of[memory_id]),
        behind=behind,
    )
    for index, done in enumerate(results):
        memory = replaced.get(done.memory.id)
        if memory is not None:
            if index == row_of[done.memory.id]:
                outcome = Outcome.STORED
            else:
                outcome = Outcome.DUPLICATE if others_outdated else done.outcome
            results[index] = Remembered(memory, outcome)


def _dated_now(memory: Memory) -> Memory:
    """``memory`` created and updated now: a new memory is dated when it is written."""
    now = utc_now()
    return replace(memory, created_at=now, updated_at=now)


def rewritten(
    old: Memory,
    text: str,
    category: Category | None,
    metadata: Mapping[str, Any] | None,
    keys: tuple[str, ...],
    *,
    keep_history: bool = True,
    at: datetime | None = None,
) -> Memory:
    """``old`` given ``text`` (and ``category``, ``metadata`` and ``keys``, where not None) at
    time ``at`` (default now), its old text kept in ``history`` unless ``keep_history`` is
    False: what :meth:`~.engine.MemoryStore.update` writes, and an item that ``replaces`` a
    memory. ``old`` itself if nothing changes (replaying a supersede is harmless)."""
    if (
        text == old.text
        and category in (None, old.category)
        and metadata is None
        and keys == old.keys
    ):
        return old
    revision = Revision(old.text, old.category, at or utc_now())
    history = old.history
    if not keep_history:
        history = ()
    elif text != old.text:
        history = (*old.history, revision)
    return replace(
        old,
        text=text,
        category=category or old.category,
        metadata=metadata if metadata is not None else old.metadata,
        created_at=min(old.created_at, revision.replaced_at),  # never updated before it was made
        updated_at=revision.replaced_at,
        history=history,
        keys=keys,
    )


def _revised(old: Memory, new: Memory, *, at: datetime | None = None) -> Memory:
    """``old`` rewritten with the text and category of ``new`` (and its metadata, if it has
    any) at time ``at`` (default now), the old text kept in ``history`` with ``new``'s own
    earlier texts (an imported memory's), oldest first."""
    revision = Revision(old.text, old.category, at or utc_now())
    history = [*old.history, revision]
    known = {r.text for r in history} | {new.text}
    history += [r for r in new.history if r.text not in known]
    return replace(
        old,
        text=new.text,
        category=new.category,
        metadata=new.metadata or old.metadata,
        keys=new.keys,
        created_at=min(old.created_at, revision.replaced_at),  # never updated before it was made
        updated_at=revision.replaced_at,
        history=tuple(sorted(history, key=lambda r: r.replaced_at)),
    )


def _known_better(held: Memory, imported: Memory, now: datetime) -> bool:
    """Whether the stored memory ``held`` knows as much as ``imported``, another version of
    the same memory, or more: it says the same, or it was updated as late or later (a text
    said again later is current again: "Lives in Paris", then "Berlin", then "Paris").

    A held time later than now was written while the clock ran ahead, and orders nothing:
    the held memory then knows better only if it replaced the imported text (which is in its
    history, and its own text is not in the imported one's); else the imported one
    supersedes it, and its text joins the history: nothing is lost."""
    if held.text == imported.text and held.category == imported.category:
        return True
    if held.updated_at <= now:
        return imported.updated_at <= held.updated_at
    held_before = {r.text for r in held.history}
    imported_before = {r.text for r in imported.history}
    return imported.text in held_before and held.text not in imported_before


def _same_memory(held: Memory, imported: Memory) -> bool:
    """Whether ``imported``, an exported memory whose id the stored memory ``held`` holds, is
    another version of it. An id this library made is the :func:`.concurrency.wording_id` of
    the user and the text the memory was first stored with (its oldest history entry); any
    other id (a hand-written file's "m1", another system's) proves nothing, unless the two
    share a text, worded alike (one replaced the other's text, or they say the same)."""
    first = imported.history[0].text if imported.history else imported.text
    if held.id == wording_id(imported.user_id, first):
        return True
    held_texts = {same_wording_key(t) for t in (held.text, *(r.text for r in held.history))}
    return any(
        same_wording_key(t) in held_texts
        for t in (imported.text, *(r.text for r in imported.history))
    )


def _outdated(draft: Memory, memory_id: str, changed: Mapping[str, datetime] | None) -> bool:
    """Whether the memory ``memory_id`` changed after the dated ``draft`` was said (per
    ``changed``, the memories' ``updated_at``; None: the draft is not dated)."""
    return changed is not None and changed.get(memory_id, draft.updated_at) > draft.updated_at


def _earlier_neighbours(vectors: Vectors, floor: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each row of a batch, the earlier rows at least ``floor`` similar to it (at most
    :data:`_EARLIER_KEPT`), most similar first, with their similarities. Computed a block of
    rows at a time, each block one matrix product on one BLAS thread: a product per row, on
    every core, made a batch of 8,000 spend seconds here on a busy 2-core machine."""
    if len(vectors) < 2:  # a single item has no earlier ones
        return [(np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.float32))] * len(vectors)
    found: list[tuple[np.ndarray, np.ndarray]] = []
    with one_blas_thread():
        for start in range(0, len(vectors), _SIMILARITY_BLOCK):
            stop = min(start + _SIMILARITY_BLOCK, len(vectors))
            block = vectors[start:stop] @ vectors[:stop].T
            for offset in range(stop - start):
                similar = block[offset, : start + offset]
                rows = np.flatnonzero(similar >= floor)
                rows = rows[most_similar(similar[rows], _EARLIER_KEPT)]
                found.append((rows, similar[rows]))
    return found


def _nearest_in_chunks(
    collection: UserCollection, vectors: Vectors, limit: int
) -> list[list[tuple[str, float]]]:
    """:meth:`UserCollection.nearest` for every row, :data:`_READ_CHUNK` rows per request."""
    found: list[list[tuple[str, float]]] = []
    for start in range(0, len(vectors), _READ_CHUNK):
        found += collection.nearest(vectors[start : start + _READ_CHUNK], limit)
    return found


def _keyed(*memories: Memory) -> bool:
    """Whether any of these memories is stored with keys (its vector is not its text's)."""
    return any(memory.keys for memory in memories)


def _catalog_in_chunks(collection: UserCollection, ids: Sequence[str]) -> dict[str, Catalogued]:
    unique = list(dict.fromkeys(ids))
    found: dict[str, Catalogued] = {}
    for start in range(0, len(unique), _READ_CHUNK):
        found.update(collection.catalog(unique[start : start + _READ_CHUNK]))
    return found


def _get_in_chunks(collection: UserCollection, ids: Sequence[str]) -> list[Memory]:
    unique = list(dict.fromkeys(ids))
    found: list[Memory] = []
    for start in range(0, len(unique), _READ_CHUNK):
        found += collection.get(unique[start : start + _READ_CHUNK])
    return found


def _still_applies(
    decision: _Decision, existing: Memory | None, draft: Memory, threshold: float | None
) -> bool:
    """Whether a decision made on a cached text holds for the memory as read: it exists, and
    if its text changed (another process wrote it), the new text relates the same way."""
    if existing is None:
        return False
    if decision.checked_text is None or existing.text == decision.checked_text:
        return True
    if threshold is None:
        return same_wording(existing.text, draft.text)
    wanted = Relation.DUPLICATE if decision.outcome is Outcome.DUPLICATE else Relation.UPDATE
    # the similarity is not known for the changed text: judge it as a rewording would be
    return relate(existing.text, draft.text, 0.0, duplicate_threshold=threshold) is wanted
