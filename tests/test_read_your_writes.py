"""A user's next call uses what their previous call stored, however fast the model answers,
while the call that stored it never waits."""

from __future__ import annotations

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

    def slower(*args, **kwargs):
        time.sleep(8)
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
    assert stored_call < 5 and next_call < 5  # neither waited for the 8 s store
    assert client.memory.flush(30)
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]


def test_a_call_does_not_wait_for_writes_held_behind_a_failing_one(
    openai_server, db_path, model, model_says
) -> None:
    """While the store is down, each turn's write waits (in order) behind the user's first,
    which failed and is retried: every later call waited the whole read-your-writes second
    for writes that could not be tried yet, a second a call for as long as the outage."""
    from headroom_memory_integrations import StorageError

    client = with_fast_memory(
        openai_server.client(), user_id="carol", db_path=db_path, embedder=model
    )
    ask(client, "hello")

    def down(*args, **kwargs):
        raise StorageError("could not store memories: the disk went away")

    client.memory.add_many = down  # type: ignore[method-assign]
    writer = client._flow.flow.jobs
    settled: list[bool] = []
    settle = writer.settle
    writer.settle = lambda memory, *args, **kwargs: (
        settled.append(  # type: ignore[method-assign]
            settle(memory, *args, **kwargs)
        )
        or settled[-1]
    )
    for number in range(7):
        model_says.memories = [{"text": f"Works at Acme{number}", "category": "fact"}]
        ask(client, f"I work at Acme{number} now")
    # while the first write's backoff is shorter than the wait, a call may still wait for the
    # writes behind it (they may run); once it is longer, none waits its second in vain
    assert len(settled) >= 5 and settled[-3:] == [True, True, True]
    assert client.memory.stats()["background"]["retried"] >= 1  # the first write is retried
