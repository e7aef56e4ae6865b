"""Saving and loading a MemoryChatModel with LangChain's own ``dumpd`` / ``dumps`` / ``load`` /
``loads``: the dump carries the wrapped model (as LangChain serializes it, keys as secret
references), the user, where their memories are and the memory settings, never a key; loading
it, in this process or another, reopens that user's memories. Also: the content blocks of the
standard tests that download their inputs (images, PDFs, audio) reach the wrapped model unchanged.

The wrapped model is a real ``ChatOpenAI`` over real HTTP to a :class:`ScriptedOpenAIServer`;
memories are in real Chroma with the real all-MiniLM-L6-v2 model.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from _langchain_support import (
    ScriptedChat,
    TokenRecorder,
    assert_clean,
    instruction_nonce,
    sent,
    texts,
)
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.load import dumpd, dumps, load, loads
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI

from headroom_memory_integrations import LocalEmbedder, MemoryStore
from headroom_memory_integrations.errors import InvalidInputError
from headroom_memory_integrations.langchain import MemoryChatModel
from headroom_memory_integrations.prompts import CONTEXT_OPEN
from headroom_memory_integrations.storage import ChromaStorage
from headroom_memory_integrations.testing import ScriptedOpenAIServer

# load / loads are "beta" in langchain-core: they warn on every call
pytestmark = pytest.mark.filterwarnings("ignore:The function `load:DeprecationWarning")

TEA = {"text": "Prefers green tea over coffee", "category": "preference"}
ANSWER = "Noted, green tea it is!"
KEY = "sk-scripted-secret"
NAMESPACES = ["headroom_memory_integrations"]
ALLOWED = [MemoryChatModel, ChatOpenAI]
SECRETS = {"OPENAI_API_KEY": KEY}  # what the loading app supplies


def chat_openai(server: ScriptedOpenAIServer) -> ChatOpenAI:
    return ChatOpenAI(model="gpt-4o-mini", base_url=server.base_url, api_key=KEY, max_retries=0)


@pytest.fixture
def says(openai_server: ScriptedOpenAIServer) -> ScriptedChat:
    chat = ScriptedChat(ANSWER, memories=[TEA])
    openai_server.responder = chat
    return chat


# -- the dump, and loading it ----------------------------------------------------------------------


def test_a_saved_model_loads_in_a_new_process_with_its_users_memories_only(
    openai_server: ScriptedOpenAIServer, db_path: Path, model: LocalEmbedder, says: ScriptedChat
) -> None:
    alice = MemoryChatModel(
        model=chat_openai(openai_server), user_id="alice", db_path=db_path, embedder=model
    )
    alice.invoke("I always drink green tea.")
    assert texts(alice.memory) == [TEA["text"]]
    bob = MemoryChatModel(
        model=chat_openai(openai_server), user_id="bob", db_path=db_path, embedder=model
    )
    saved = {"alice": dumps(alice), "bob": dumps(bob)}
    assert KEY not in json.dumps(saved)
    says.memories = []  # the other process only reads: this one holds the folder's write lock

    code = """
        import json, sys
        from langchain_core.load import loads
        from langchain_openai import ChatOpenAI
        from headroom_memory_integrations.langchain import MemoryChatModel

        for text in json.load(sys.stdin).values():
            chat = loads(
                text,
                allowed_objects=[MemoryChatModel, ChatOpenAI],
                valid_namespaces=["headroom_memory_integrations"],
                secrets_map={"OPENAI_API_KEY": "sk-given-to-the-loader"},
            )
            print(json.dumps([chat.user_id, chat.invoke("What should I drink this morning?").text]))
        """
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        input=json.dumps(saved),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    assert [json.loads(line) for line in run.stdout.splitlines()] == [
        ["alice", ANSWER],
        ["bob", ANSWER],
    ]
    chats = [r for r in openai_server.requests if r.path == "/v1/chat/completions"][-2:]
    assert [r.headers["authorization"] for r in chats] == ["Bearer sk-given-to-the-loader"] * 2
    alice_sees, bob_sees = (json.dumps(r.body["messages"]) for r in chats)  # type: ignore[index]
    assert CONTEXT_OPEN in alice_sees and TEA["text"] in alice_sees
    assert CONTEXT_OPEN not in bob_sees and "green tea" not in bob_sees


def test_the_dump_carries_the_store_and_its_settings_and_never_a_key(
    openai_server: ScriptedOpenAIServer, tmp_path: Path, model: LocalEmbedder
) -> None:
    chat = MemoryChatModel(
        model=chat_openai(openai_server),
        user_id="alice",
        db_path=tmp_path / "memories",
        queue_path=tmp_path / "jobs.sqlite3",
        top_k=3,
        injection="user",
        min_score=0.4,
        duplicate_threshold=None,
        stop=["\nUser:"],
        embedder=model,
    )
    saved = dumpd(chat)
    assert saved["id"] == ["headroom_memory_integrations", "langchain", "MemoryChatModel"]
    kwargs = saved["kwargs"]
    assert kwargs["model"]["id"] == ["langchain", "chat_models", "openai", "ChatOpenAI"]
    assert kwargs["model"]["kwargs"]["openai_api_key"] == {
        "lc": 1,
        "type": "secret",
        "id": ["OPENAI_API_KEY"],
    }
    assert {k: v for k, v in kwargs.items() if k != "model"} == {
        "user_id": "alice",
        "db_path": str(tmp_path / "memories"),
        "queue_path": str(tmp_path / "jobs.sqlite3"),
        "top_k": 3,
        "injection": "user",
        "min_score": 0.4,
        "duplicate_threshold": None,
        "stop": ["\nUser:"],
    }
    assert KEY not in dumps(chat)

    loaded = load(
        saved,
        allowed_objects=ALLOWED,
        valid_namespaces=NAMESPACES,
        secrets_map=SECRETS,
    )
    assert loaded.asdict() == chat.asdict()
    assert loaded.memory is not chat.memory
    assert loaded.memory.storage is chat.memory.storage  # the same embedded folder
    assert (loaded.user_id, loaded.memory.min_score, loaded.memory.duplicate_threshold) == (
        "alice",
        0.4,
        None,
    )
    assert (loaded.top_k, loaded.injection, loaded.stop) == (3, "user", ["\nUser:"])
    assert loaded._memory_flow.flow.jobs is chat._memory_flow.flow.jobs  # the same queue file
    assert loaded.model.openai_api_key.get_secret_value() == KEY  # from the loader, not the dump


def test_a_model_built_from_a_name_round_trips_with_its_settings(
    openai_server: ScriptedOpenAIServer, db_path: Path, says: ScriptedChat
) -> None:
    chat = MemoryChatModel(
        model="openai:gpt-4o-mini",
        base_url=openai_server.base_url,
        api_key=KEY,
        temperature=0.2,
        max_tokens=50,
        timeout=30,
        max_retries=0,
        user_id="alice",
        db_path=db_path,
    )
    saved = dumps(chat)
    assert KEY not in saved
    loaded = loads(
        saved,
        allowed_objects=ALLOWED,
        valid_namespaces=NAMESPACES,
        secrets_map=SECRETS,
    )
    assert loaded.asdict() == chat.asdict()
    inner = loaded.model
    assert (inner.temperature, inner.max_tokens, inner.request_timeout, inner.max_retries) == (
        0.2,
        50,
        30,
        0,
    )
    assert loaded.invoke("I always drink green tea.").text == ANSWER
    assert texts(loaded.memory) == [TEA["text"]]


def test_a_store_passed_as_memory_is_saved_as_its_folder(
    openai_server: ScriptedOpenAIServer, store: MemoryStore
) -> None:
    chat = MemoryChatModel(model=chat_openai(openai_server), memory=store)
    saved = dumpd(chat)
    assert saved["kwargs"]["db_path"] == store.storage.location  # absolute
    assert Path(saved["kwargs"]["db_path"]).is_absolute()
    loaded = load(saved, allowed_objects=ALLOWED, valid_namespaces=NAMESPACES, secrets_map=SECRETS)
    assert (loaded.user_id, loaded.memory.storage) == ("alice", store.storage)


def test_a_server_store_is_saved_as_its_url_without_credentials(
    openai_server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    # built, saved and loaded without contacting the server: Chroma is reached on first use
    storage = ChromaStorage.connect("127.0.0.1", 9, headers={"Authorization": "Bearer chroma-key"})
    chat = MemoryChatModel(
        model=chat_openai(openai_server),
        user_id="alice",
        storage=storage,
        queue_path=tmp_path / "jobs.sqlite3",
    )
    saved = dumps(chat)
    assert "chroma-key" not in saved and KEY not in saved
    data = json.loads(saved)
    assert data["kwargs"]["db_path"] == "http://127.0.0.1:9"
    # the saved storage has no headers: another place than the one saved, which keeps its queue
    # file in this process (a wrapper on another place naming that file is refused)
    data["kwargs"]["queue_path"] = str(tmp_path / "loaded-jobs.sqlite3")
    loaded = loads(
        json.dumps(data), allowed_objects=ALLOWED, valid_namespaces=NAMESPACES, secrets_map=SECRETS
    )
    assert loaded.memory.storage.location == "http://127.0.0.1:9"


def test_the_default_store_is_found_again_where_the_model_is_loaded(
    openai_server: ScriptedOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEADROOM_MEMORY_DB", str(tmp_path / "here"))
    chat = MemoryChatModel(model=chat_openai(openai_server), user_id="alice")
    saved = dumpd(chat)
    assert "db_path" not in saved["kwargs"]  # not frozen: like the constructor, the default
    monkeypatch.setenv("HEADROOM_MEMORY_DB", str(tmp_path / "there"))
    loaded = load(saved, allowed_objects=ALLOWED, valid_namespaces=NAMESPACES, secrets_map=SECRETS)
    assert loaded.memory.storage.location == str(tmp_path / "there")


# -- what cannot be saved ------------------------------------------------------------------------


def test_what_cannot_be_saved_says_why_and_what_to_do(
    openai_server: ScriptedOpenAIServer, tmp_path: Path, model: LocalEmbedder
) -> None:
    import chromadb
    from chromadb.config import Settings

    client = chromadb.EphemeralClient(settings=Settings(anonymized_telemetry=False))
    by_hand = MemoryChatModel(
        model=chat_openai(openai_server),
        user_id="alice",
        storage=ChromaStorage(client),
        embedder=model,
        queue_path=tmp_path / "jobs.sqlite3",
    )
    with pytest.raises(InvalidInputError, match=r"cannot be opened again from a db_path.*db_path="):
        dumpd(by_hand)

    other_embedder = MemoryChatModel(
        model=chat_openai(openai_server),
        memory=MemoryStore("alice", tmp_path / "m", embedder=LocalEmbedder("my/own-model")),
    )
    with pytest.raises(InvalidInputError, match=r"embedded with LocalEmbedder\(model='my/own"):
        dumpd(other_embedder)

    fake = MemoryChatModel(
        model=GenericFakeChatModel(messages=iter(["Hi there."])),
        user_id="alice",
        db_path=tmp_path / "m",
        embedder=model,
    )
    with pytest.raises(InvalidInputError, match="GenericFakeChatModel is not serializable"):
        dumpd(fake)


def test_a_model_that_cannot_be_saved_still_answers_and_callbacks_get_langchains_stub(
    tmp_path: Path, model: LocalEmbedder
) -> None:
    fake = MemoryChatModel(
        model=GenericFakeChatModel(messages=iter(["Hi there."])),
        user_id="alice",
        db_path=tmp_path / "m",
        embedder=model,
    )
    recorder = TokenRecorder()
    assert fake.invoke("Hello", config={"callbacks": [recorder]}).text == "Hi there."
    serialized = json.loads(recorder.outputs[0])
    assert serialized["type"] == "not_implemented"
    assert serialized["id"][-1] == "MemoryChatModel"


def test_callbacks_are_told_the_saved_form_without_a_key(
    openai_server: ScriptedOpenAIServer, db_path: Path, model: LocalEmbedder, says: ScriptedChat
) -> None:
    chat = MemoryChatModel(
        model=chat_openai(openai_server), user_id="alice", db_path=db_path, embedder=model
    )
    recorder = TokenRecorder()
    chat.invoke("I always drink green tea.", config={"callbacks": [recorder]})
    assert json.loads(recorder.outputs[0]) == dumpd(chat)
    assert KEY not in recorder.outputs[0]
    assert_clean(*recorder.outputs, memories=[TEA["text"]])


# -- content the skipped standard tests would download ---------------------------------------------

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(64))).decode()
PDF = base64.b64encode(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n").decode()
WAV = base64.b64encode(b"RIFF$\x00\x00\x00WAVEfmt " + bytes(28)).decode()

MULTIMODAL = [
    HumanMessage(
        [
            {"type": "text", "text": "What should I drink this afternoon? Describe these:"},
            {"type": "image", "base64": PNG, "mime_type": "image/png"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            {"type": "file", "base64": PDF, "mime_type": "application/pdf", "filename": "a.pdf"},
            {
                "type": "file",
                "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{PDF}"},
            },
            {"type": "audio", "base64": WAV, "mime_type": "audio/wav"},
            {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}},
        ]
    )
]
TOOL_RESULTS = [
    HumanMessage("Get a picture and a PDF with the tool."),
    AIMessage([], tool_calls=[{"type": "tool_call", "id": "1", "name": "fetch", "args": {}}]),
    ToolMessage(
        content=[
            {"type": "image", "base64": PNG, "mime_type": "image/png"},
            {"type": "file", "base64": PDF, "mime_type": "application/pdf", "filename": "a.pdf"},
        ],
        tool_call_id="1",
        name="fetch",
    ),
]


def split(content: str | list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """A message's text, and its other parts (images, files, audio) in order."""
    parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
    text = "\n".join(part["text"] for part in parts if part["type"] == "text")
    return text, [part for part in parts if part["type"] != "text"]


def fetch() -> str:
    """Fetch a picture and a PDF."""
    return ""


@pytest.mark.parametrize("injection", ["system", "user"])
def test_images_pdfs_and_audio_reach_the_wrapped_model_unchanged(
    openai_server: ScriptedOpenAIServer,
    db_path: Path,
    model: LocalEmbedder,
    says: ScriptedChat,
    injection: Any,
) -> None:
    chat = MemoryChatModel(
        model=chat_openai(openai_server),
        user_id="alice",
        db_path=db_path,
        embedder=model,
        injection=injection,
    )
    chat.memory.add(TEA["text"], category="preference")
    for messages, tools in ((MULTIMODAL, []), (TOOL_RESULTS, [fetch])):
        plain = chat.model.bind_tools(tools) if tools else chat.model
        plain.invoke(messages)
        expected = [m for m in sent(openai_server) if m["role"] in ("user", "tool")]
        answer = (chat.bind_tools(tools) if tools else chat).invoke(messages)
        got = sent(openai_server)
        assert instruction_nonce(got)  # the call went through memory
        assert_clean(answer)
        parts = [m for m in got if m["role"] in ("user", "tool")]
        assert len(parts) == len(expected)
        latest_user = [part for part in parts if part["role"] == "user"][-1]
        for given, original in zip(parts, expected, strict=True):
            if injection == "user" and given is latest_user:
                # the memory prompt leads the latest user message; its own parts follow
                given_text, given_files = split(given["content"])
                original_text, original_files = split(original["content"])
                assert given_files == original_files
                assert given_text.endswith(original_text) and given_text != original_text
            else:
                assert given == original
    assert CONTEXT_OPEN in json.dumps(sent(openai_server, -3))  # the memory went with the files
