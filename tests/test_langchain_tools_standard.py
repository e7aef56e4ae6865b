"""LangChain's standard tool tests (langchain-tests) on search_memory and manage_memory.

Each tool is built for one fixed user on a real embedded Chroma and the local model, and run
outside an agent, as the suites run tools. Our own tests of the tools inside agents are in
test_langchain_tools.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from langchain_tests.integration_tests import ToolsIntegrationTests
from langchain_tests.unit_tests import ToolsUnitTests

from headroom_memory_integrations import LocalEmbedder, MemoryStore
from headroom_memory_integrations.langchain import (
    create_manage_memory_tool,
    create_search_memory_tool,
)

USER = "standard-tools"
STORED = "Drinks green tea every morning"


class _ToolsOnOneStore:
    """The tools' arguments: one user's memories in a folder of the class's own, holding
    :data:`STORED`."""

    memories_db: Path
    embedder: LocalEmbedder

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _memories(cls, tmp_path_factory: pytest.TempPathFactory, model: LocalEmbedder) -> None:
        db = tmp_path_factory.mktemp("tools-standard") / "memories"
        MemoryStore(USER, db_path=db, embedder=model).add(STORED, category="preference")
        cls.memories_db = db
        cls.embedder = model

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"user_id": USER, "db_path": self.memories_db, "embedder": self.embedder}


class _Search(_ToolsOnOneStore):
    @property
    def tool_constructor(self) -> Callable[..., Any]:
        return create_search_memory_tool

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"query": "what do I drink in the morning?", "limit": 3}


class _Manage(_ToolsOnOneStore):
    @property
    def tool_constructor(self) -> Callable[..., Any]:
        return create_manage_memory_tool

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"action": "create", "content": "Cycles to work on Fridays", "category": "fact"}


class TestSearchMemoryToolUnit(_Search, ToolsUnitTests):
    """The unit suite: construction, name, input schema."""


class TestManageMemoryToolUnit(_Manage, ToolsUnitTests):
    """The unit suite: construction, name, input schema."""


# The suites' async tests carry no marker and asyncio_mode is strict here: mark the classes (the
# sync tests' "marked asyncio but not async" warning is expected).
@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:The test <Function:pytest.PytestWarning")
class TestSearchMemoryToolIntegration(_Search, ToolsIntegrationTests):
    """The integration suite: invoked with and without a tool call, sync and async."""

    def test_the_example_finds_the_stored_memory(self, tool) -> None:
        content, found = (
            tool.invoke(self.tool_invoke_params_example),
            tool.invoke(
                {
                    "type": "tool_call",
                    "id": "1",
                    "name": tool.name,
                    "args": self.tool_invoke_params_example,
                }
            ),
        )
        assert STORED in content
        assert [memory["text"] for memory in found.artifact] == [STORED]


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:The test <Function:pytest.PytestWarning")
class TestManageMemoryToolIntegration(_Manage, ToolsIntegrationTests):
    """The integration suite: invoked with and without a tool call, sync and async."""

    def test_the_example_is_stored_once(self, tool) -> None:
        tool.invoke(self.tool_invoke_params_example)
        tool.invoke(self.tool_invoke_params_example)
        texts = [m.text for m in MemoryStore(USER, db_path=self.memories_db).get_all()]
        assert sorted(texts) == sorted([STORED, "Cycles to work on Fridays"])
