"""LangChain's own standard test suites (langchain-tests) for MemoryChatModel.

The wrapped model is a real ``ChatOpenAI``, built by MemoryChatModel from its name with the
suites' standard settings, talking real HTTP to a :class:`ScriptedOpenAIServer` whose responder
reads each request (tools, tool_choice, response_format, the memory instruction) and answers as
a cooperative model would. Memory is real: Chroma in a temp dir and the all-MiniLM-L6-v2 model.

langchain-tests loads pytest-socket, which blocks nothing unless asked (no ``--disable-socket``
here). The unit suite is marked so that no connection can be made at all (``allow_hosts([])``:
building the model, binding tools and structured output need no network; sockets may still be
created, as ChatOpenAI does at construction to probe TCP keep-alive options). The integration
suite may connect to 127.0.0.1 only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _langchain_support import ScriptedChat
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from headroom_memory_integrations import LocalEmbedder, MemoryStore
from headroom_memory_integrations.langchain import MemoryChatModel
from headroom_memory_integrations.testing import ScriptedOpenAIServer

UNREACHABLE_URL = "http://127.0.0.1:9/v1"  # never contacted: unit tests make no request


@pytest.fixture(scope="class")
def class_memory(tmp_path_factory: pytest.TempPathFactory) -> MemoryStore:
    """A user's memories for a whole suite: embedded Chroma and the real local model."""
    folder: Path = tmp_path_factory.mktemp("standard-memories")
    return MemoryStore("standard-user", db_path=folder, embedder=LocalEmbedder())


@pytest.mark.allow_hosts([])
class TestMemoryChatModelUnit(ChatModelUnitTests):
    @pytest.fixture(autouse=True)
    def _memory(self, class_memory: MemoryStore) -> None:
        self.memory = class_memory

    @property
    def chat_model_class(self) -> type[MemoryChatModel]:
        return MemoryChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {
            "model": "openai:gpt-4o-mini",
            "base_url": UNREACHABLE_URL,
            "api_key": "sk-unit",
            "memory": self.memory,
        }

    # test_serdes is skipped by the suite ("Model is not serializable"): MemoryChatModel is
    # deliberately not LangChain-serializable, since loading one would reopen a user's
    # memories from a serialized dict; its dumpd() is the "not implemented" stub with the repr.

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        # the wrapped model built from a name reads its key from the environment as usual
        return (
            {"OPENAI_API_KEY": "sk-from-env"},
            {"model": "openai:gpt-4o-mini", "base_url": UNREACHABLE_URL, "memory": self.memory},
            {"model_name": "gpt-4o-mini", "user_id": "standard-user"},
        )


@pytest.mark.allow_hosts(["127.0.0.1"])
# The suite's async tests carry no marker and asyncio_mode is strict here. One event loop for
# the class: langchain-openai shares one async HTTP client (and its open connections) between
# models with the same settings, so a loop per test would meet the previous test's closed loop.
@pytest.mark.asyncio(loop_scope="class")
@pytest.mark.filterwarnings("ignore:The test <Function:pytest.PytestWarning")
class TestMemoryChatModelIntegration(ChatModelIntegrationTests):
    server: ScriptedOpenAIServer

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _server(cls) -> Iterator[ScriptedOpenAIServer]:
        responder = ScriptedChat(
            "Hello! Nice to hear from you.",
            memories=[{"text": "Likes friendly greetings", "category": "preference"}],
        )
        with ScriptedOpenAIServer(responder=responder) as server:
            cls.server = server
            yield server

    @pytest.fixture(autouse=True)
    def _memory(self, class_memory: MemoryStore) -> None:
        self.memory = class_memory

    @property
    def chat_model_class(self) -> type[MemoryChatModel]:
        return MemoryChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {
            "model": "openai:gpt-4o-mini",
            "base_url": self.server.base_url,
            "api_key": "sk-scripted",
            "max_retries": 0,
            "model_options": {"stream_usage": True},
            "memory": self.memory,
        }

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        return "gpt-4o"

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    # The suite skips the tests of the five properties below when they are False. Each of those
    # tests downloads its input at run time (an image from github.com, a PDF from w3.org, a
    # WAV file from wikimedia.org), and no host but 127.0.0.1 is reachable here; nor could the
    # scripted model describe an image. MemoryChatModel passes such content through unchanged.

    @property
    def supports_image_inputs(self) -> bool:
        return False  # skips test_image_inputs: downloads an image

    @property
    def supports_image_tool_message(self) -> bool:
        return False  # skips test_image_tool_message: downloads an image

    @property
    def supports_pdf_inputs(self) -> bool:
        return False  # skips test_pdf_inputs: downloads a PDF

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False  # skips test_pdf_tool_message: downloads a PDF

    @property
    def supports_audio_inputs(self) -> bool:
        return False  # skips test_audio_inputs: downloads a WAV file

    @property
    def supports_anthropic_inputs(self) -> bool:
        # skips test_anthropic_inputs: Anthropic-format messages (thinking blocks with
        # signatures, tool_use blocks) need a real Anthropic model; the wrapped one is ChatOpenAI
        return False

    @property
    def enable_vcr_tests(self) -> bool:
        # skips test_stream_time: it replays cassettes recorded from a real provider
        return False
