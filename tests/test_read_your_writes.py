"""A user's next call uses what their previous call stored, however fast the model answers,
while the call that stored it never waits."""

from __future__ import annotations

import threading
import time

import pytest

from headroom_memory_integrations.openai import with_fast_memory
from headroom_memory_integrations.prompts import CONTEXT_OPEN

pytestmark = pytest.mark.openai_client

PYTHON = {"text": "Prefers Python for backend work", "category": "preference"}


def ask(client, text: str):
    return client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": text}]
    )


def test_the_next_call_sees_the_previous_calls_memory(
    openai_server, db_path, model, model_says
) -> None:
    client = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=model
    )
    client.memory.search("warm up the collection")  # so the timing below is the store's own
    for turn in range(3):  # the README's quick start, back to back in one process
        model_says.memories = [PYTHON]
        ask(client, "I prefer Python for backend work")
        model_says.memories = []
        ask(client, "What language should I use?")
        sent = openai_server.requests[-1].body["messages"]
        assert CONTEXT_OPEN in sent[0]["content"], f"turn {turn}: nothing injected"
        assert "Prefers Python for backend work" in sent[0]["content"]
        client.memory.clear()


def test_the_storing_call_itself_does_not_wait(openai_server, db_path, model, model_says) -> None:
    client = with_fast_memory(
        openai_server.client(), user_id="bob", db_path=db_path, embedder=model
    )
    ask(client, "hello")  # first call: opens everything
    slow_store = client.memory.add_many

    let_store = threading.Event()

    def slower(*args, **kwargs):
        let_store.wait(300)  # a store that takes minutes, until both calls have answered
        return slow_store(*args, **kwargs)

    client.memory.add_many = slower  # type: ignore[method-assign]
    model_says.memories = [PYTHON]
    started = time.monotonic()
    ask(client, "I prefer Python for backend work")
    stored_call = time.monotonic() - started
    model_says.memories = []
    started = time.monotonic()
    ask(client, "Tell me a joke")  # waits at most READ_YOUR_WRITES_SECONDS, never forever
    next_call = time.monotonic() - started
    assert stored_call < 60 and next_call < 60  # neither waited for the store (300 s)
    let_store.set()
    assert client.memory.flush(60)
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]
