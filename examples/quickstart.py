"""The main job, end to end: a chat client that remembers its users across conversations.

``with_fast_memory`` wraps an OpenAI client. Alice tells it a few things; a new process (a new
conversation, days later) asks questions and the model gets her relevant memories, while an
unrelated question gets none, and Bob never sees Alice's memories.

With ``OPENAI_API_KEY`` set it talks to the real API (``OPENAI_MODEL``, default gpt-4o-mini);
without it, to a scripted OpenAI-compatible server on 127.0.0.1 that follows the memory
prompts, so no key and no network are needed. Memories are kept in embedded Chroma in
``.headroom-memory-demo`` with the local all-MiniLM-L6-v2 model. Run it with ``make demo``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from headroom_memory_integrations import with_fast_memory

DB = ".headroom-memory-demo"
MODEL = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")

FIRST_CONVERSATION = [
    "Hi! I prefer Python for backend work. I'm a data engineer at a fintech startup.",
    "My team runs everything on PostgreSQL. I am migrating the billing service to Kubernetes.",
]
LATER_QUESTIONS = [
    "What language should I use for my new service?",
    "Which database would fit my team?",
    "What is 2+2?",
]


@contextlib.contextmanager
def openai_client() -> Iterator[Any]:
    """The real client when a key is set, else one for a scripted local server."""
    if os.environ.get("OPENAI_API_KEY"):
        from openai import OpenAI

        yield OpenAI()
        return
    from headroom_memory_integrations.testing import MemoryFollowingModel, ScriptedOpenAIServer

    with ScriptedOpenAIServer(responder=MemoryFollowingModel()) as server:
        yield server.client()


def chat(client: Any, text: str) -> str:
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}]
    )
    return str(answer.choices[0].message.content)


def first_conversation() -> None:
    print("=== Conversation 1: Alice tells the assistant about herself")
    with openai_client() as client:
        alice = with_fast_memory(client, user_id="alice", db_path=DB)
        for text in FIRST_CONVERSATION:
            print(f"  alice: {text}\n  model: {chat(alice, text)}")
        alice.memory.flush(30)  # memories are stored off the call's path; wait before exiting
        print("\n  remembered about alice:")
        for memory in alice.memory.get_all():
            print(f"    [{memory.category}] {memory.text}")


def later_conversation() -> None:
    print("=== Conversation 2, days later, in a new process")
    with openai_client() as client:
        alice = with_fast_memory(client, user_id="alice", db_path=DB)
        for number, question in enumerate(LATER_QUESTIONS):
            began = time.perf_counter()
            found = alice.memory.search(question)
            took = (time.perf_counter() - began) * 1000
            print(f"  alice: {question}")
            if found:
                for memory, score in found:
                    print(f"    injected ({score:.2f}): {memory.text}")
            else:
                print("    injected: nothing (no memory is relevant enough)")
            first = " (the first loads the model and the memories)" if number == 0 else ""
            print(f"    search took {took:.1f} ms{first}\n  model: {chat(alice, question)}")
        bob = with_fast_memory(client, user_id="bob", db_path=DB)
        print(f"  bob: {LATER_QUESTIONS[0]}\n  model: {chat(bob, LATER_QUESTIONS[0])}")
        stats = alice.memory.stats()
        print(f"\n  alice has {stats['total_memories']} memories: {stats['by_category']}")


def main() -> None:
    if sys.argv[1:] == ["--later"]:
        later_conversation()
        return
    shutil.rmtree(DB, ignore_errors=True)  # start fresh, so every run shows the same thing
    print("(model: " + (MODEL if os.environ.get("OPENAI_API_KEY") else "scripted, offline") + ")\n")
    first_conversation()
    print(flush=True)  # before the child writes to the same output
    subprocess.run([sys.executable, __file__, "--later"], check=True)


if __name__ == "__main__":
    main()
