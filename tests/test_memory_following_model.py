"""MemoryFollowingModel: the offline stand-in that follows the memory prompts for demos and docs."""

from __future__ import annotations

import json

import pytest

from headroom_memory_integrations.openai import with_fast_memory, with_memory
from headroom_memory_integrations.prompts import background_extraction_messages
from headroom_memory_integrations.testing import MemoryFollowingModel, ScriptedOpenAIServer

pytestmark = pytest.mark.openai_client


def test_statements_become_third_person_memories() -> None:
    found = MemoryFollowingModel._memories(
        "I prefer Python for backend work. I'm a data engineer. My team uses PostgreSQL. "
        "What should I use?"
    )
    assert found == [
        {"text": "Prefers Python for backend work", "category": "preference"},
        {"text": "Is a data engineer", "category": "fact"},
        {"text": "User's team uses PostgreSQL", "category": "fact"},
    ]


def test_answers_background_extraction_calls() -> None:
    model = MemoryFollowingModel()
    body = {
        "messages": background_extraction_messages([{"role": "user", "content": "I have a cat"}])
    }
    reply = model(body)
    assert json.loads(reply.content or "") == {
        "memories": [{"text": "Has a cat", "category": "fact"}]
    }


def test_the_whole_loop_offline(db_path, model) -> None:
    with ScriptedOpenAIServer(responder=MemoryFollowingModel()) as server:
        client = with_fast_memory(server.client(), user_id="alice", db_path=db_path, embedder=model)

        def ask(text: str) -> str:
            answer = client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": text}]
            )
            return answer.choices[0].message.content or ""

        assert ask("I prefer Python for backend work.") == "Thanks, I will keep that in mind."
        assert ask("What language should I use?") == (
            "From what I remember: Prefers Python for backend work."
        )
        background = with_memory(server.client(), user_id="bob", db_path=db_path, embedder=model)
        background.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "I live in Lisbon."}]
        )
        assert background.memory.flush(30)
        assert [m.text for m in background.memory.get_all()] == ["Lives in Lisbon"]
