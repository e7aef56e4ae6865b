"""Fit an OpenAI chat-format conversation into a token budget by dropping its oldest turns.

Token counting works offline. The default counter is tiktoken's ``o200k_base`` (else
``cl100k_base``), loaded only from a local cache file whose SHA-256 is checked first, so
tiktoken never reaches its download path. Directories searched: ``$TIKTOKEN_CACHE_DIR``,
``$DATA_GYM_CACHE_DIR``, ``<tempdir>/data-gym-cache`` and the copy that llama-index-core
ships in ``llama_index/core/_static/tiktoken_cache``. Without tiktoken or a cached encoding,
:func:`estimate_tokens` (``ceil(utf8_bytes / 3)``, generous for English) is used. Either way
the counter is resolved once per process; tiktoken and llama-index are never imported at
module import time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import InvalidInputError

__all__ = ["MESSAGE_OVERHEAD", "TOOL_CALL_OVERHEAD", "RollingWindowTransform", "estimate_tokens"]

MESSAGE_OVERHEAD = 4
"""Tokens added per message for the role and chat-format delimiters (OpenAI uses 3-4)."""
TOOL_CALL_OVERHEAD = 4
"""Tokens added per tool call, on top of its function name and arguments."""

_BLOB = "https://openaipublic.blob.core.windows.net/encodings/"
_ENCODINGS = {  # name -> sha256, exactly as in tiktoken_ext.openai_public
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
_TOOL_RESULT_ROLES = frozenset({"tool", "function"})
_PINNED = frozenset({"system", "developer"})
_TURN_START_ROLES = _PINNED | {"user"}
_LOCK = threading.Lock()
_default_counter: tuple[Callable[[str], int], str] | None = None

Message = dict[str, Any]


def estimate_tokens(text: str) -> int:
    """Offline fallback counter: one token per three UTF-8 bytes, rounded up."""
    return math.ceil(len(text.encode("utf-8")) / 3)


def _cache_dirs() -> list[Path]:
    """Directories that may hold tiktoken cache files, without importing llama-index."""
    dirs = [os.environ.get("TIKTOKEN_CACHE_DIR"), os.environ.get("DATA_GYM_CACHE_DIR")]
    dirs.append(os.path.join(tempfile.gettempdir(), "data-gym-cache"))
    try:
        spec = importlib.util.find_spec("llama_index")  # finds, never imports, a top-level name
    except (ImportError, ValueError):
        spec = None
    for location in (spec and spec.submodule_search_locations) or []:
        dirs.append(os.path.join(location, "core", "_static", "tiktoken_cache"))
    return [Path(d) for d in dirs if d]


def _load_tiktoken(dirs: Sequence[Path]) -> tuple[Callable[[str], int], str] | None:
    """Load the first encoding whose verified cache file is in ``dirs``; None if impossible."""
    try:
        import tiktoken
    except ImportError:
        return None
    for name, sha256 in _ENCODINGS.items():
        key = hashlib.sha1(f"{_BLOB}{name}.tiktoken".encode(), usedforsecurity=False).hexdigest()
        for directory in dirs:
            try:
                if hashlib.sha256((directory / key).read_bytes()).hexdigest() != sha256:
                    continue
            except OSError:
                continue
            previous = os.environ.get("TIKTOKEN_CACHE_DIR")
            os.environ["TIKTOKEN_CACHE_DIR"] = str(directory)  # only for this load
            try:
                encoding = tiktoken.get_encoding(name)
            except Exception:  # a broken install must not break counting: try the next one
                continue
            finally:
                if previous is None:
                    os.environ.pop("TIKTOKEN_CACHE_DIR", None)
                else:
                    os.environ["TIKTOKEN_CACHE_DIR"] = previous
            return _length_of(encoding.encode_ordinary), f"tiktoken:{name}"
    return None


def _length_of(encode: Callable[[str], list[int]]) -> Callable[[str], int]:
    return lambda text: len(encode(text))


def _get_default_counter() -> tuple[Callable[[str], int], str]:
    """The process-wide default counter and its name, resolved on first use."""
    global _default_counter
    with _LOCK:
        if _default_counter is None:
            loaded = _load_tiktoken(_cache_dirs())
            _default_counter = loaded or (estimate_tokens, "estimate:ceil(utf8_bytes/3)")
        return _default_counter


class RollingWindowTransform:
    """Keep the newest turns of a chat conversation that fit in ``max_tokens``.

    Rules, in order:

    * Leading ``system``/``developer`` messages are always kept when ``keep_system`` is true
      (later ones age out with their turn).
    * The rest is split into atomic units: one message, or an assistant message with
      ``tool_calls``/``function_call`` plus the ``tool``/``function`` results that follow it.
      Units are kept or dropped whole, so no call loses its results and no result its call.
    * The newest units that fit are kept. If anything was dropped, the window then starts at
      a ``user`` (or system/developer) message rather than at an assistant reply.
    * The latest ``user`` message (or, with none, the newest unit) is always kept. If it does
      not fit, it is kept whole anyway, with the newest later units that still fit; only then
      can the result exceed ``max_tokens``. Text is never truncated.

    Messages are dicts, or an SDK's message objects with ``model_dump`` (the OpenAI SDK's
    ``ChatCompletionMessage``, appended to the history as in OpenAI's function-calling guide):
    such an object is read, and kept, as its ``model_dump(exclude_none=True)``. So are the
    SDK's objects inside a dict (``{"role": "assistant", "tool_calls": message.tool_calls}``):
    tool calls, a ``function_call`` and content parts are counted as their dumps.

    The window counts only the messages it is given. A memory wrapper adds its own to the
    request after it (``with_fast_memory``: a system message of about 230 tokens of instruction
    plus the memories, about 450 tokens with ``top_k=5``, up to 1,000 with long memories):
    leave room for it in ``max_tokens``.

    The input is never mutated. The result is a new list of shallow copies of the kept
    messages: new dicts, but nested values (content parts, ``tool_calls``) are shared.

    Args:
        max_tokens: Token budget for the returned messages, as measured by :meth:`count`.
        keep_system: Pin the leading system/developer messages.
        token_counter: ``str -> int`` overriding the default (offline tiktoken or estimate).
        media_tokens: Cost charged for each non-text content part (image, audio, file).

    Raises:
        InvalidInputError: If ``max_tokens`` is not a positive int or ``media_tokens`` < 0.
    """

    def __init__(
        self,
        max_tokens: int,
        *,
        keep_system: bool = True,
        token_counter: Callable[[str], int] | None = None,
        media_tokens: int = 85,
    ) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise InvalidInputError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if isinstance(media_tokens, bool) or not isinstance(media_tokens, int) or media_tokens < 0:
            raise InvalidInputError(f"media_tokens must be an int >= 0, got {media_tokens!r}")
        if token_counter is not None and not callable(token_counter):
            raise InvalidInputError("token_counter must be a callable str -> int")
        self.max_tokens = max_tokens
        self.keep_system = keep_system
        self.media_tokens = media_tokens
        if token_counter is None:
            self.token_counter, self.counter_name = _get_default_counter()
        else:
            name = getattr(token_counter, "__qualname__", type(token_counter).__name__)
            self.token_counter, self.counter_name = token_counter, f"custom:{name}"

    def __repr__(self) -> str:
        return (
            f"RollingWindowTransform(max_tokens={self.max_tokens}, "
            f"keep_system={self.keep_system}, counter={self.counter_name!r})"
        )

    def count(self, messages: Sequence[Mapping[str, Any]]) -> int:
        """Tokens the messages cost: content, names, refusals and tool calls plus per-item
        overheads."""
        return sum(self._cost(m) for m in _validate(messages))

    def apply(self, messages: Sequence[Mapping[str, Any]]) -> list[Message]:
        """Return the newest part of ``messages`` that fits the budget (see class docs).

        Raises:
            InvalidInputError: If ``messages`` is not a list/tuple of dicts (or message
                objects with ``model_dump``) with a ``role``.
        """
        msgs = _validate(messages)
        pinned_n = 0
        while self.keep_system and pinned_n < len(msgs) and _role(msgs[pinned_n]) in _PINNED:
            pinned_n += 1
        pinned = [dict(m) for m in msgs[:pinned_n]]
        units = _group(msgs[pinned_n:])
        if not units:
            return pinned
        costs = [sum(self._cost(m) for m in unit) for unit in units]
        budget = self.max_tokens - sum(self._cost(m) for m in pinned)
        starts = [_role(unit[0]) for unit in units]
        users = [i for i, role in enumerate(starts) if role == "user"]
        anchor = users[-1] if users else len(units) - 1
        start = _fitting_suffix(costs, 0, budget)
        if start <= anchor:
            if start > 0 and any(r in _TURN_START_ROLES for r in starts[start : anchor + 1]):
                while starts[start] not in _TURN_START_ROLES:
                    start += 1
            kept = units[start:]
        else:  # the latest turn is too big: its user message plus its newest units that fit
            tail = _fitting_suffix(costs, anchor + 1, budget - costs[anchor])
            kept = [units[anchor], *units[tail:]]
        return pinned + [dict(m) for unit in kept for m in unit]

    def _cost(self, message: Mapping[str, Any]) -> int:
        count = self.token_counter
        total = MESSAGE_OVERHEAD + self._content_cost(message.get("content"))
        if message.get("name"):
            total += count(str(message["name"])) + 1
        if isinstance(message.get("refusal"), str):  # an assistant message that refused
            total += count(message["refusal"])
        # the SDK's tool call objects, put in a dict as they came ({"role": "assistant",
        # "tool_calls": completion.choices[0].message.tool_calls}), are read as dicts
        calls = [_as_dict(call) for call in message.get("tool_calls") or []]
        if message.get("function_call"):
            calls.append({"function": _as_dict(message["function_call"])})
        for call in calls:
            total += TOOL_CALL_OVERHEAD
            # a function call's arguments, or a custom tool call's free-form input
            for kind, field in (("function", "arguments"), ("custom", "input")):
                body = call.get(kind) if isinstance(call, Mapping) else None
                if isinstance(body, Mapping):
                    total += count(str(body.get("name") or "")) + count(str(body.get(field) or ""))
        return total

    def _content_cost(self, content: Any) -> int:
        if content is None:
            return 0
        if isinstance(content, str):
            return self.token_counter(content)
        if not isinstance(content, list | tuple):
            raise InvalidInputError(f"content must be str, None or a list, not {type(content)}")
        total = 0
        for part in map(_as_dict, content):
            if isinstance(part, str):
                total += self.token_counter(part)
            elif isinstance(part, Mapping) and part.get("type") in _TEXT_PARTS:
                total += self.token_counter(str(part.get(_TEXT_PARTS[part["type"]]) or ""))
            elif isinstance(part, Mapping):
                total += self.media_tokens
            else:
                raise InvalidInputError(f"content part must be a dict, not {type(part)}")
        return total


def _as_dict(value: Any) -> Any:
    """``value``, or, for an SDK object with ``model_dump`` (a pydantic model such as the OpenAI
    SDK's ``ChatCompletionMessageToolCall``), its ``model_dump(exclude_none=True)``."""
    if not isinstance(value, Mapping) and callable(getattr(value, "model_dump", None)):
        return value.model_dump(exclude_none=True)
    return value


def _validate(messages: Any) -> list[Mapping[str, Any]]:
    """The messages as mappings: an SDK's message object (the OpenAI SDK's
    ``ChatCompletionMessage``, appended to the history as in OpenAI's function-calling guide)
    becomes its ``model_dump(exclude_none=True)``."""
    if not isinstance(messages, list | tuple):
        raise InvalidInputError(f"messages must be a list of dicts, not {type(messages)}")
    valid: list[Mapping[str, Any]] = []
    for i, message in enumerate(messages):
        message = _as_dict(message)
        if not isinstance(message, Mapping):
            raise InvalidInputError(f"messages[{i}] must be a dict, not {type(message)}")
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise InvalidInputError(f"messages[{i}] has no 'role'")
        valid.append(message)
    return valid


def _role(message: Mapping[str, Any]) -> str:
    return str(message["role"])


def _group(messages: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Split into atomic units; tool/function results stick to the message before them."""
    units: list[list[Mapping[str, Any]]] = []
    for message in messages:
        if units and _role(message) in _TOOL_RESULT_ROLES:
            units[-1].append(message)
        else:
            units.append([message])
    return units


def _fitting_suffix(costs: Sequence[int], lower: int, budget: int) -> int:
    """Smallest ``start >= lower`` such that ``sum(costs[start:]) <= budget``."""
    start, used = len(costs), 0
    while start > lower and used + costs[start - 1] <= budget:
        start -= 1
        used += costs[start]
    return start
