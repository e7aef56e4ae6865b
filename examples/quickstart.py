"""The main job, on the embedded default: two users' memories stored with the local
all-MiniLM-L6-v2 model in embedded Chroma, then recalled by later questions.

No API key and no network. Run it with ``make demo``.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from headroom_memory_integrations import MemoryStore

DB = Path(sys.argv[1] if len(sys.argv) > 1 else ".headroom-memory-demo")

CONVERSATIONS = {
    "alice": [
        ("I prefer Python for backend work", "preference"),
        ("Works as a data engineer at a fintech startup", "fact"),
        ("Her team runs everything on PostgreSQL", "fact"),
        ("Is migrating the billing service to Kubernetes this quarter", "context"),
    ],
    "bob": [
        ("Prefers Rust and dislikes garbage-collected languages", "preference"),
        ("Is a vegetarian", "fact"),
        ("Lives in Lisbon", "fact"),
        ("Is planning a hiking trip to the Alps in June", "context"),
    ],
}

LATER_QUESTIONS = [
    "What language should I use for my new service?",
    "Where should I travel this summer?",
    "What is 2+2?",
]


def main() -> None:
    shutil.rmtree(DB, ignore_errors=True)  # start fresh, so every run shows the same thing
    started = time.perf_counter()
    stores = {user: MemoryStore(user, db_path=DB) for user in CONVERSATIONS}
    for user, facts in CONVERSATIONS.items():
        stored = stores[user].add_many([{"text": t, "category": c} for t, c in facts])
        print(f"stored {len(stored)} memories for {user}")
    print(f"(model loaded and memories written in {time.perf_counter() - started:.2f} s)\n")

    for user, store in stores.items():
        print(f"=== {user}: a new conversation, days later")
        for question in LATER_QUESTIONS:
            began = time.perf_counter()
            results = store.search(question, top_k=2)
            took = (time.perf_counter() - began) * 1000
            print(f"  Q: {question}   ({took:.1f} ms)")
            if not results:
                print("     nothing relevant: no memory injected")
            for memory, score in results:
                print(f"     {score:.2f}  [{memory.category}] {memory.text}")
        print()
    print(f"stats for alice: {stores['alice'].stats()}")


if __name__ == "__main__":
    main()
