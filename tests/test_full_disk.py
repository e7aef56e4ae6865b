"""A full disk (issue 11, item 4), on a real 96 MB tmpfs: writes are refused with a clear error
before Chroma can meet the full disk halfway through one, reads keep working, every acknowledged
memory is there (also for a new process), the refused write is not, and once space is freed
writes work again."""

from __future__ import annotations

import json

import pytest
from _reliability_support import (
    RandomEmbedder,
    fill_disk,
    is_root,
    run_python,
    small_filesystem,
)

from headroom_memory_integrations import MemoryStore, StorageError
from headroom_memory_integrations.storage.folder import MIN_FREE_BYTES

pytestmark = pytest.mark.skipif(not is_root(), reason="mounting a small tmpfs needs root")


def test_a_full_disk_refuses_writes_keeps_reads_and_loses_nothing(tmp_path) -> None:
    with small_filesystem(tmp_path / "disk", 96) as disk:
        db = disk / "memories"
        store = MemoryStore("alice", db_path=db, embedder=RandomEmbedder(dimension=384))
        store.add("The first fact")
        filler = fill_disk(disk, leave_bytes=MIN_FREE_BYTES + 6 * 2**20)
        acknowledged = ["The first fact"]
        refused: list[str] = []
        for batch in range(500):
            padding = " ".join(["Some padding words."] * 20)
            texts = [f"Batch {batch} fact {i}. {padding}" for i in range(50)]
            try:
                store.add_many(texts)
            except StorageError as exc:
                assert "full" in str(exc) and "Nothing was written" in str(exc)
                refused = texts
                break
            acknowledged += texts
        assert refused and len(acknowledged) > 50  # some batches fitted, then one was refused

        stored = {m.text for m in store.get_all()}
        assert stored == set(acknowledged)  # nothing lost, nothing of the refused write
        assert store.count() == len(acknowledged)
        found = store.search(acknowledged[-1], top_k=1, min_score=-1)
        assert [r.memory.text for r in found] == [acknowledged[-1]]
        with pytest.raises(StorageError, match="full"):
            store.add_many(refused)  # refused again while the disk stays full

        filler.unlink()
        store.add_many(refused)
        acknowledged += refused
        run = run_python(
            f"""
            import json
            from _reliability_support import RandomEmbedder
            from headroom_memory_integrations import MemoryStore
            store = MemoryStore("alice", db_path={str(db)!r}, embedder=RandomEmbedder(384))
            texts = [m.text for m in store.get_all()]
            top = store.search({acknowledged[-2]!r}, top_k=1, min_score=-1)[0].memory.text
            print(json.dumps([texts, top]))
            """
        )
        assert run.returncode == 0, run.stderr
        texts, top = json.loads(run.stdout.splitlines()[-1])
        assert sorted(texts) == sorted(acknowledged) and top == acknowledged[-2]
        store.storage.close()
