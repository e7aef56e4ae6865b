"""What tests/test_atomic.py shares with its stress run: texts that consolidation keeps apart
or merges, and processes that add them at the same moment.

The stress run (not in CI) repeats what the CI test does once, with rewordings too, and prints
the figures of docs/reliability.md section 5::

    chroma run --path /tmp/chroma --port 8791 &
    .venv/bin/python tests/_atomic_support.py http://127.0.0.1:8791 8
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Sequence

_ACTIVITIES = [
    "works on the billing service",
    "prefers Rust for tooling",
    "is on call on Fridays",
    "lives near the office",
    "reviews the frontend pull requests",
    "runs the weekly retro",
    "owns the deployment scripts",
    "joined the team last spring",
    "mentors the new interns",
    "maintains the data pipeline",
]
DISTINCT = [f"Teammate {n} {_ACTIVITIES[n % len(_ACTIVITIES)]}" for n in range(100)]
"""100 facts that consolidation keeps apart: one store adding them all keeps 100."""

REWORDED = [
    ("Takes 20 mg of lisinopril every morning", "Takes 20mg of lisinopril every morning"),
    ("Allergic to shellfish and peanuts", "Allergic to peanuts and shellfish"),
    ("Runs 5 km three times a week", "Runs 5 km 3 times a week"),
    ("Works at Stripe as a software engineer", "Works as a software engineer at Stripe"),
    ("Manages a team of 8 engineers", "Manages a team of eight engineers"),
    ("User's daughter is 7 years old", "User's daughter is seven years old"),
    ("Bikes to work", "Really bikes to work"),
    ("Lives in Berlin with their partner", "Lives with their partner in Berlin"),
    ("Lives in a two-bedroom apartment", "Lives in a 2-bedroom apartment"),
    ("Codes in Python and TypeScript", "Codes in TypeScript and Python"),
    ("Deploys with Docker and Kubernetes", "Deploys with Kubernetes and Docker"),
    ("Uses Vim and tmux", "Uses tmux and Vim"),
    ("Likes Italian and Thai food", "Likes Thai and Italian food"),
    ("Hates cilantro", "Really hates cilantro"),
    ("Studies Spanish on Tuesdays and Fridays", "Studies Spanish on Fridays and Tuesdays"),
    ("Goes to the gym on Mondays and Thursdays", "Goes to the gym on Thursdays and Mondays"),
    ("Speaks French and German", "Speaks German and French"),
    ("Has two cats", "Has 2 cats"),
    ("Feeds the cat at 7am and 6pm", "Feeds the cat at 6pm and 7am"),
    ("Plays guitar and piano", "Plays piano and guitar"),
]
"""Pairs that consolidation calls duplicates (either way round), each unrelated to the others."""


_WRITER = """
import json, sys
from headroom_memory_integrations import MemoryStore
url, user, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
store = MemoryStore(user, db_path=url)
store.search("warm up")  # load the model and connect before the start
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps([store.remember(text).outcome.value for text in texts]))
"""


def processes_adding(
    url: str, user: str, texts_of: Sequence[Sequence[str]]
) -> list[list[str] | str]:
    """Start one process per list of texts; once all have loaded the model and connected, let
    them add at the same moment. Returns each process's outcomes, or the last line of its error
    if it failed."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, url, user, json.dumps(list(texts))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for texts in texts_of
    ]
    try:
        for process in processes:
            assert process.stdout is not None and process.stderr is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a writer failed to start: {process.stderr.read()}")
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        results: list[list[str] | str] = []
        for process in processes:
            out, err = process.communicate(timeout=240)
            failed = process.returncode != 0
            results.append(err.strip().splitlines()[-1] if failed else json.loads(out))
        return results
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def with_every_fifth(texts: Sequence[str], inserted: Sequence[str]) -> list[str]:
    """``texts`` with ``inserted[k]`` after every fifth one (so processes reach it together)."""
    mixed = list(texts)
    for k, text in reversed(list(enumerate(inserted))):
        mixed.insert(5 * (k + 1), text)
    return mixed


def stress(url: str, trials: int) -> None:
    """Four processes add the 100 texts, two of them with the first of each reworded pair after
    every fifth text and two with the second, ``trials`` times; print what was kept."""
    from headroom_memory_integrations import MemoryStore

    originals, rewordings = zip(*REWORDED)
    first = with_every_fifth(DISTINCT, originals)
    second = with_every_fifth(DISTINCT, rewordings)
    for trial in range(trials):
        user = f"atomic-stress-{uuid.uuid4().hex[:8]}"
        results = processes_adding(url, user, [first, second] * 2)
        kept = Counter(m.text for m in MemoryStore(user, db_path=url).get_all())
        both = sum(a in kept and b in kept for a, b in REWORDED)
        lost = sum(a not in kept and b not in kept for a, b in REWORDED)
        twice = sum(count > 1 for count in kept.values())
        failures = [r for r in results if isinstance(r, str)]
        print(
            f"trial {trial}: {sum(kept.values())} memories (expected "
            f"{len(DISTINCT) + len(REWORDED)}), {twice} texts stored twice, {both} reworded "
            f"pairs both kept, {lost} pairs lost, {len(failures)} writers failed {failures}",
            flush=True,
        )


if __name__ == "__main__":
    stress(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5)
