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

import re
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest
from _langchain_support import ScriptedChat
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from headroom_memory_integrations import LocalEmbedder, MemoryStore
from headroom_memory_integrations.langchain import MemoryChatModel
from headroom_memory_integrations.testing import ScriptedOpenAIServer

lc_load = import_module("langchain_core.load.load")  # the module (`load` is also a function)
UNREACHABLE_URL = "http://127.0.0.1:9/v1"  # never contacted: unit tests make no request


@pytest.fixture(scope="class")
def class_memory(tmp_path_factory: pytest.TempPathFactory) -> MemoryStore:
    """A user's memories for a whole suite: embedded Chroma and the real local model."""
    folder: Path = tmp_path_factory.mktemp("standard-memories")
    return MemoryStore("standard-user", db_path=folder, embedder=LocalEmbedder())


@pytest.fixture(scope="module")
def vcr_config() -> dict[str, Any]:
    """How test_stream_time replays its cassette (tests/cassettes/test_langchain_standard/):
    a stream recorded from the scripted server (``--record-mode=rewrite`` records it again).
    Requests match on method and path only, the path without the server's run prefix: the
    server's port and run prefix and the nonce in the body change every run. No network is
    used otherwise: pytest-recording replays only."""
    return {
        "match_on": ["method", "path"],
        "before_record_request": _without_run_prefix,
        "filter_headers": ["authorization"],
        "allow_playback_repeats": True,
    }


def _without_run_prefix(request: Any) -> Any:
    request.uri = re.sub(r"^(\w+://[^/]+)/run-[0-9a-f]+/", r"\1/", request.uri)
    return request


@pytest.mark.allow_hosts([])
class TestMemoryChatModelUnit(ChatModelUnitTests):
    # The memories are in the relative folder "memories" of a temp working directory: the
    # serialized model (test_serdes's snapshot) carries db_path as given, the same every run.

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _working_directory(cls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(tmp_path_factory.mktemp("standard-unit"))
            yield

    @pytest.fixture(autouse=True)
    def _loadable_with_allowed_objects_all(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # test_serdes loads with allowed_objects="all", which langchain-core 1.x limits to the
        # classes in its serialization mapping (LangChain's own and its partner packages'), so
        # no other package's class passes it unless listed there: list MemoryChatModel for the
        # test, as LangChain lists a partner's model. (Apps load with an explicit allowlist:
        # allowed_objects=[MemoryChatModel, ChatOpenAI]; see test_langchain_serdes.py.)
        path = tuple(MemoryChatModel.lc_id())
        monkeypatch.setitem(lc_load.ALL_SERIALIZABLE_MAPPINGS, path, path)
        monkeypatch.setattr(lc_load, "_default_class_paths_cache", {})

    @property
    def chat_model_class(self) -> type[MemoryChatModel]:
        return MemoryChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {
            "model": "openai:gpt-4o-mini",
            "base_url": UNREACHABLE_URL,
            "api_key": "sk-unit",
            "user_id": "standard-user",
            "db_path": "memories",
        }

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        # the wrapped model built from a name reads its key from the environment as usual
        return (
            {"OPENAI_API_KEY": "sk-from-env"},
            {
                "model": "openai:gpt-4o-mini",
                "base_url": UNREACHABLE_URL,
                "user_id": "standard-user",
                "db_path": "memories",
            },
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

    # The only skips left. The suite skips the tests of the five properties below when they
    # are False. Each of those tests downloads its input at run time (an image from
    # raw.githubusercontent.com, a PDF from w3.org, a WAV file from upload.wikimedia.org) with
    # httpx, and no host but 127.0.0.1 is reachable here. MemoryChatModel hands such content to
    # the wrapped model unchanged: test_langchain_serdes.py sends each of these content blocks
    # (small local files) through it to the scripted server.

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
        # runs test_anthropic_inputs: ChatOpenAI turns Anthropic-format tools and histories
        # (tool_use blocks, thinking blocks) into its own, so the scripted server answers them
        return True

    @property
    def enable_vcr_tests(self) -> bool:
        return True  # runs test_stream_time from its cassette (see vcr_config above)
