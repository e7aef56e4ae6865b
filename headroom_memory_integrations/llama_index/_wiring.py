"""The store and flow behind each LlamaIndex memory class, from the arguments users pass."""

from __future__ import annotations

import difflib
import os
import secrets
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from llama_index.core.llms import LLM
from pydantic import BaseModel

from ..embeddings import Embedder
from ..engine import MemoryStore, validate_user_id
from ..errors import InvalidInputError
from ..flow import MemoryFlow
from ..storage import Storage
from ..wiring import build_flow, open_memory, reopening_arguments
from ..writer import BackgroundExtractor
from ._extract import llm_completer

PathLike = str | os.PathLike[str]
_NOT_FIELDS = ("memory", "storage", "embedder", "llm", "queue_path")  # the classes' other keywords


def path_text(path: PathLike | None) -> str | None:
    """A folder or server URL as text (what a memory class serializes), or None."""
    return None if path is None else os.fspath(path)


def memory_fields(
    owner: type[BaseModel], memory: MemoryStore | None, data: dict[str, Any]
) -> dict[str, Any]:
    """The pydantic fields of ``owner``, a memory class that learns in the background:
    ``user_id`` taken from ``memory`` when given, ``db_path`` as text. A name that is no field
    of it is refused, as Python refuses an unknown keyword (pydantic would drop it silently,
    and ``dbpath=`` would keep memories where the user did not ask)."""
    unknown = sorted(set(data) - set(owner.model_fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*owner.model_fields, *_NOT_FIELDS], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(
            f"{owner.__name__}() got an unexpected keyword argument {unknown[0]!r}{hint}"
        )
    if memory is not None:
        data.setdefault("user_id", memory.user_id)
    if data.get("user_id") is not None:  # before pydantic would turn b"alice" into "alice"
        validate_user_id(data["user_id"])
    data["db_path"] = path_text(data.get("db_path"))
    return data


def check_llm(llm: object) -> None:
    """Refuse an extraction ``llm`` that is not a LlamaIndex LLM (a model name, an openai
    client): every extraction would fail, be retried, and nothing would be learnt."""
    if llm is not None and not isinstance(llm, LLM):
        raise InvalidInputError(
            f"llm must be a LlamaIndex LLM (e.g. llama_index.llms.openai.OpenAI), got "
            f"{type(llm).__name__}: nothing could ever be learnt with it"
        )


def background_flow(
    owner: Any,
    memory: MemoryStore | None,
    *,
    storage: Storage | None,
    embedder: Embedder | None,
    llm: LLM | None,
    queue_path: PathLike | None,
) -> MemoryFlow:
    """The flow of ``owner`` (a memory class with ``user_id``, ``db_path``, ``top_k`` and
    ``untrusted_context`` fields, and ``_unsaveable``, ``_extraction_llm`` and ``_queue_path``
    private attributes, which it sets): it injects the user's memories and learns in the
    background through ``llm``. ``owner.db_path`` becomes the location that opens the same
    memories again from anywhere (an absolute folder, or a server's URL), so that what it
    serializes finds them; when the memories cannot be opened again from ``user_id`` and
    ``db_path`` alone, ``owner._unsaveable`` says why (see :func:`check_saveable`)."""
    check_llm(llm)
    store = open_memory(memory, owner.user_id, owner.db_path, storage=storage, embedder=embedder)
    extractor = BackgroundExtractor(llm_completer(llm))
    flow = build_flow(
        store,
        inline=False,
        top_k=owner.top_k,
        extractor=extractor,
        queue_path=queue_path,
        untrusted_context=owner.untrusted_context,
    )
    location, owner._unsaveable = reopening_location(store)
    if location is not None:
        owner.db_path = location
    owner._extraction_llm, owner._queue_path = llm, queue_path
    return flow


@dataclass(eq=False)
class LiveLLM:
    """The extraction LLM of a memory object, shared with the copies restored from what it
    serialized in this process (an agent's ``Context`` is serialized and rebuilt between two
    runs): registered under a random key that the copies carry, for the same user and
    memories only. It lives as long as one of them does."""

    llm: LLM | None
    user_id: str
    db_path: str | None


_LIVE_LLMS: weakref.WeakValueDictionary[str, LiveLLM] = weakref.WeakValueDictionary()
_LIVE_LLMS_LOCK = threading.Lock()


def register_llm(llm: LLM | None, user_id: str, db_path: str | None) -> tuple[str, LiveLLM]:
    """A new key for ``llm``, the extraction LLM of ``user_id``'s memories at ``db_path``, and
    its registration (which the memory object keeps alive)."""
    key, live = secrets.token_hex(16), LiveLLM(llm, user_id, db_path)
    with _LIVE_LLMS_LOCK:
        _LIVE_LLMS[key] = live
    return key, live


def live_llm(key: str | None, user_id: str, db_path: str | None) -> LiveLLM | None:
    """The registration of ``key`` in this process when it is for ``user_id``'s memories at
    ``db_path``, else None: a copy made for another user, or for other memories, never gets
    the LLM (nor does one restored in another process)."""
    with _LIVE_LLMS_LOCK:
        live = _LIVE_LLMS.get(key) if key else None
    if live is None or (live.user_id, live.db_path) != (user_id, db_path):
        return None
    return live


def reopening_location(memory: MemoryStore) -> tuple[str | None, str | None]:
    """``(db_path, None)``: the location that opens ``memory`` again by ``user_id`` and
    ``db_path`` (absolute); or ``(None, why)`` when a store reopened so would not be the same
    (see :func:`~headroom_memory_integrations.wiring.reopening_arguments`)."""
    try:
        arguments = reopening_arguments(memory)
    except InvalidInputError as exc:
        return None, str(exc)
    others = sorted(set(arguments) - {"db_path"})
    if others:
        return arguments["db_path"], (
            f"the memories of {memory.user_id!r} use a non-default {' and '.join(others)}, "
            "which a memory class restored from its user_id and db_path would not have; "
            "reopen the store yourself and pass it as memory=MemoryStore(...)"
        )
    return arguments["db_path"], None


def check_saveable(owner: Any) -> None:
    """Raise when ``owner``'s memories cannot be opened again from what it serializes.

    Raises:
        InvalidInputError: saved, ``owner`` would come back without its memories.
    """
    if owner._unsaveable:
        raise InvalidInputError(
            f"cannot serialize {type(owner).__name__}: restored, it would not find its "
            f"memories: {owner._unsaveable}"
        )


class Pickled:
    """Pickling for a memory class (``pickle``: a process pool, a cache that pickles its
    values): its state is the arguments that open the same memories again (the class's
    ``_reopening_arguments``: ``user_id``, ``db_path``, its settings, the LLM it was given,
    ``queue_path``), never a client; unpickling calls ``__init__`` with them.

    LlamaIndex's own pickling (``BaseComponent``) drops what does not pickle (the memory flow)
    and calls ``__init__`` with the fields alone: without ``llm=``, so a ``MemoryLLM`` came
    back without its flow, and a memory class with another embedder than the default one
    came back on a store that refused its memories. Memories that cannot be opened again
    from their ``user_id`` and ``db_path`` are refused, as by ``to_dict``.
    """

    def _reopening_arguments(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        check_saveable(self)
        return {"arguments": self._reopening_arguments()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        reopen: Any = self
        reopen.__init__(**state["arguments"])
