"""During an outage, a user's next call does not wait for writes held behind one that keeps
failing (``MemoryWriter.settle``), while a single passing failure keeps read-your-writes: a
real job queue file, real embedded Chroma, an embedder that can be switched off."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _reliability_support import wait_for
from conftest import HashEmbedder

from headroom_memory_integrations import MemoryStore
from headroom_memory_integrations.jobs import Backoff
from headroom_memory_integrations.writer import writer_for


class SwitchableEmbedder(HashEmbedder):
    """Hash vectors, or a ConnectionError (retried, as a down embedding server's) while
    ``down`` is set; ``calls`` counts every try."""

    def __init__(self) -> None:
        super().__init__()
        self.down = threading.Event()
        self.calls = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        if self.down.is_set():
            raise ConnectionError("the embedding server is down")
        return super().embed(texts)


@dataclass(frozen=True)
class FirstThenLater(Backoff):
    """``first`` seconds before a job's first retry, ``later`` before each one after."""

    first: float = 1.0
    later: float = 3.0

    def delay(self, attempts: int) -> float:
        return self.first if attempts <= 1 else self.later


def fact(text: str) -> list[dict[str, str]]:
    return [{"text": text, "category": "fact"}]


def texts(memory: MemoryStore) -> set[str]:
    return {m.text for m in memory.get_all()}


def test_a_call_does_not_wait_for_the_retry_of_a_write_that_failed_again(
    tmp_path: Path,
) -> None:
    """A write that failed once and is retried within the call's wait is waited for (a
    passing failure keeps read-your-writes); one that failed again is not, however soon its
    retry is due: each retry cost a call up to its whole second, for as long as the outage
    lasted (a review: one slow call per retry, every 16-60 s)."""
    embedder = SwitchableEmbedder()
    writer = writer_for(tmp_path / "jobs.sqlite3", backoff=FirstThenLater(first=1.0, later=3.0))
    carol = MemoryStore("carol", db_path=tmp_path / "memories", embedder=embedder)
    writer.register(carol)
    try:
        writer.store(carol, fact("Plays the cello"))
        assert writer.settle(carol, 30)  # the collection is open

        embedder.down.set()  # a passing failure: the next call waits for its retry
        writer.store(carol, fact("Has a cat named Tom"))
        wait_for(lambda: writer.stats()["retried"] >= 1)  # retried in a second
        embedder.down.clear()
        writer.store(carol, fact("Lives in Porto"))
        assert writer.settle(carol, 5)
        assert {"Has a cat named Tom", "Lives in Porto"} <= texts(carol)

        embedder.down.set()  # an outage: the write fails, and fails again on its retry
        writer.store(carol, fact("Runs marathons"))
        wait_for(lambda: writer.stats()["retried"] >= 3)  # then in 3 s
        writer.store(carol, fact("Is learning Japanese"))  # held behind it
        tries = embedder.calls
        # its next retry is due within this wait; the call does not wait for it
        assert writer.settle(carol, 5) is False
        assert embedder.calls == tries, "the call waited for the failing write's retry"
        assert writer.settle_timeouts == 0

        embedder.down.clear()  # the outage ends: the held writes are stored and read
        assert writer.flush(30)
        assert writer.settle(carol)
        assert {"Runs marathons", "Is learning Japanese"} <= texts(carol)
    finally:
        embedder.down.clear()
        carol.close(5)


def test_closing_one_store_of_a_user_keeps_the_note_another_store_of_theirs_uses(
    tmp_path: Path,
) -> None:
    """Two stores of one user (a wrapper and a LangChain model, or a wrapper per request):
    closing one during an outage cleared the user's note that their writes are held, while the
    other was in use (the writer keeps only the newest store of each user), and each of the
    other's calls waited its whole second again until the failing write's next retry."""
    embedder = SwitchableEmbedder()
    writer = writer_for(tmp_path / "jobs.sqlite3", backoff=FirstThenLater(first=60.0))
    db_path = tmp_path / "memories"
    carol = MemoryStore("carol", db_path=db_path, embedder=embedder)
    dave = MemoryStore("dave", db_path=db_path, embedder=embedder)  # the workers stay open
    writer.register(carol)
    writer.register(dave)
    try:
        writer.store(carol, fact("Plays the cello"))
        assert writer.settle(carol, 30)

        embedder.down.set()
        writer.store(carol, fact("Has a cat named Tom"))
        wait_for(lambda: writer.stats()["retried"] == 1)  # retried in a minute
        writer.store(carol, fact("Lives in Porto"))
        assert writer.settle(carol) is False  # held behind it: not waited for
        assert writer.settle_timeouts == 0

        carols_other = MemoryStore("carol", db_path=db_path, embedder=embedder)
        writer.register(carols_other)
        carols_other.close(0.1)  # (it cannot drain its user's jobs: the embedder is down)
        writer.store(carol, fact("Runs marathons"))
        assert writer.settle(carol) is False  # still held, still not waited for
        assert writer.settle_timeouts == 0, "the other store's call waited its whole second"

        embedder.down.clear()
        writer.worker.hurry()  # as when the storage is found back
        assert writer.flush(30)
        assert {"Has a cat named Tom", "Lives in Porto", "Runs marathons"} <= texts(carol)
    finally:
        embedder.down.clear()
        dave.close(5)
        carol.close(5)
