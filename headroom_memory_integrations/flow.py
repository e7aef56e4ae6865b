"""What happens around one model call, for every wrapper and adapter, with no I/O of its own.

A :class:`MemoryFlow` is the one implementation of "memory around a chat turn". The OpenAI
wrappers, the LangChain and the LlamaIndex adapters only translate their framework's messages and
answers to and from plain text; they hold no memory logic. For each model call:

1. :meth:`MemoryFlow.start` with the latest user message's text: wait (boundedly) for the
   memories the user's previous calls queued in this process to be stored (memories an inline
   block carried; a background extraction, a model call of its own, is not waited for), search
   the user's memories and
   build :attr:`Turn.prompt`, the text the caller puts in a system message just before that user
   message (the escaped context and, for inline extraction, the instruction with a fresh nonce).
2. The caller calls the model with it.
3. :meth:`MemoryFlow.finish` (a whole answer) or an :class:`AnswerStream` (delta by delta): inline,
   the memory block is cut from the answer and its memories are queued for storing; in the
   background mode, the turn is queued for a separate extraction call. Nothing is stored on the
   caller's path. A streamed answer goes through :func:`edited` / :func:`aedited`, which tell a
   stream that came to its end from one the caller left (see :class:`ItemEditor`).

Memory never fails a model call: any error here is logged, counted in ``memory.stats()``, and the
call goes on without memory.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import inspect
import json
import re
import threading
from collections import OrderedDict
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from .engine import MemoryStore, has_visible_text, search_text
from .errors import EmbeddingError, StorageError
from .grounding import grounded
from .jobs import user_tag
from .prompts import (
    ExtractedMemory,
    MemoryStreamFilter,
    extraction_instruction,
    format_memory_context,
    new_nonce,
    parse_memory_block,
    replaced_ids,
    short_ids,
)
from .redaction import logger_without_secrets
from .storage.guard import DeadlineExceeded, memory_deadline, run_within
from .types import Memory

log = logger_without_secrets("headroom_memory_integrations")

M = TypeVar("M")
R = TypeVar("R")
T = TypeVar("T")

READ_YOUR_WRITES_SECONDS = 1.0
"""A user's next call waits at most this long for the memories their previous calls queued in
this process to be stored (usually a few milliseconds: embedding and one write), so what a
user said is used in their very next call. The call that queued them waits only to put them in
the queue file, at most :data:`~.writer.QUEUE_WAIT_SECONDS`."""


LOCAL_RECALL_SECONDS = 10.0
"""For storage with no request timeout (an embedded folder), the time the memory work before a
chat call may take in all, beyond :data:`READ_YOUR_WRITES_SECONDS`: embedding the question,
opening the folder (a large collection's index loads on its first search) and searching. Work
that has no timeout of its own can block with no end (an embedder of the app's that hangs), so
it is waited for this long at most (:func:`~.storage.guard.run_within`). Not what blocks inside
chromadb's embedded core, which keeps the interpreter lock meanwhile: another process holding
the folder's ``chroma.sqlite3`` locked, or a disk that hangs, stops every thread of the process
(docs/reliability.md, section 2)."""


def recall_seconds(memory: MemoryStore) -> float:
    """The time the memory work before a chat call's model call may take, in all:
    :data:`READ_YOUR_WRITES_SECONDS` plus the storage's request timeout (a Chroma server:
    :data:`~.storage.chroma.DEFAULT_TIMEOUT`), or plus :data:`LOCAL_RECALL_SECONDS` for storage
    without one (an embedded folder). Waiting for the user's queued writes, embedding the
    question, connecting, opening the collection, searching and reading the memories all
    charge against it (:func:`~.storage.guard.memory_deadline` cuts a server's requests short;
    :func:`~.storage.guard.run_within` stops waiting for the rest); once it is up the call goes
    on without memories, and so do the store's next calls at once while that work still runs."""
    timeout = getattr(memory.storage, "timeout", None)
    return READ_YOUR_WRITES_SECONDS + float(LOCAL_RECALL_SECONDS if timeout is None else timeout)


def in_recall_time(memory: MemoryStore, work: Callable[[], T], what: str) -> T:
    """``work()``'s result (memory work of ``memory``'s: a search), waited for at most
    :func:`recall_seconds` on a helper thread (:func:`~.storage.guard.run_within`), a server's
    requests cut short at that time (:func:`~.storage.guard.memory_deadline`). The memory work
    before a chat call runs this way, and so do the searches an app's chain or an agent makes
    mid-answer (the LangChain retriever and search tool): an embedder that hangs holds none of
    them.

    Raises:
        DeadlineExceeded: (a :class:`~.errors.StorageError`) the time is up, or earlier work
            of ``memory`` or of its embedder that ran late is still running.
        Exception: what ``work`` raised.
    """
    seconds = recall_seconds(memory)

    def bounded() -> T:
        with memory_deadline(seconds):
            return work()

    # held back while late: this store, and its embedder, which other stores may share
    return run_within(bounded, seconds, (memory, memory.embedder), what)


class MemoryJobs(Protocol):
    """Where a flow sends work that must not hold up the caller (see :mod:`.writer`)."""

    def settle(self, memory: MemoryStore) -> bool:
        """Wait, briefly and boundedly, for the memories queued for ``memory``'s user in this
        process to be stored, so a user's next call reads their previous call's writes (not
        for background extractions: a model call of their own, seconds long; nor for writes
        that wait behind a failed one not retried within the wait, or failed again)."""
        ...

    def store(self, memory: MemoryStore, memories: Sequence[Mapping[str, Any]]) -> None: ...

    def extract(
        self,
        memory: MemoryStore,
        exchange: Sequence[Mapping[str, str]],
        injected: Mapping[str, str],
        model: str | None,
        untrusted: bool = False,
    ) -> bool:
        """Queue a turn's background extraction; False if the work was refused (logged and
        counted), True once it is in the queue or held for it."""
        ...


@dataclass
class Turn:
    """One model call on its way through the flow.

    Attributes:
        user_text: The latest user message (searched with; quoted in background extraction).
        prompt: The text to inject in a system message just before the latest user message
            (the memory context and/or the extraction instruction), or None for nothing.
        nonce: The memory block's nonce, when the inline instruction is in ``prompt``.
        injected: Short id shown to the model -> id of the injected memory.
        model: The model's name, for background extraction with the same model.
        untrusted: The call's context holds untrusted content (tool results, documents): its
            memories are kept only if grounded in the user's text (see :mod:`.grounding`).
        tool_loop_step: Tool results follow the latest user message: a later step of a tool
            loop, whose first step may have queued the background extraction of that message.
        later_call: A later call of a turn this flow prepared a call for already (see
            :meth:`MemoryFlow.start`'s ``later_step``): it has that call's memories, and no
            instruction once an earlier call's answer carried the memory block.
        turn_key: What identifies the call's turn (a digest of its conversation and the
            user's message), when the flow keeps it for the turn's later calls.
    """

    user_text: str | None = None
    prompt: str | None = None
    nonce: str | None = None
    injected: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    untrusted: bool = False
    tool_loop_step: bool = False
    later_call: bool = False
    turn_key: str | None = None


_Shown = tuple[tuple[str, datetime, str], ...]  # memories as (id, last changed, text's digest)


@dataclass(frozen=True)
class _Recalled:
    """What the first call of a turn was shown: the memory context, the short label of each
    memory in it by id, and those memories as they were then (None: not known, such as after
    a failed search; a later call recalls anew), and whether its search failed (counted: a
    later call of the turn whose search fails too is not counted again)."""

    context: str
    injected: dict[str, str]
    shown: _Shown | None
    failed: bool = False


def _as_shown(memories: Iterable[Memory]) -> _Shown:
    return tuple(sorted((m.id, m.updated_at, _digest(m.text)) for m in memories))


ConversationTail = tuple[str, ...]
"""A digest of each of the last messages before a user's message (see :func:`conversation_key`)."""


@dataclass(frozen=True)
class _KeptTurn:
    """A turn kept for its later calls: a digest of the user's message, the digests of the
    messages before it (None: the turn is told apart by a session's id), and what its first
    call recalled."""

    said: str
    tail: ConversationTail | None
    recalled: _Recalled

    def trimmed_to(self, tail: ConversationTail) -> bool:
        """Whether ``tail``, shorter than this turn's, is what is left of it once some of its
        messages are dropped, the rest kept in order (a chat memory trimmed between two steps
        of the turn: of its oldest messages, or of all but the first and the latest)."""
        if self.tail is None or len(tail) >= len(self.tail):
            return False
        left = iter(self.tail)
        return all(digest in left for digest in tail)


REMEMBERED_TURNS = 256
"""The turns a flow keeps what it recalled for (see :meth:`MemoryFlow.start`'s
``later_step``), the latest ones."""


class KeptTurns:
    """The latest turns a flow keeps for their later calls (by :attr:`Turn.turn_key`): what
    their first calls recalled, and which turns were learnt from. A flow built anew for the
    same user (once an adapter let the first one go) can be given its earlier flow's, so a
    turn in progress meanwhile (a tool running) goes on as one; flows that share them share
    their lock too."""

    def __init__(self) -> None:
        self.turns: OrderedDict[str, _KeptTurn] = OrderedDict()
        self.learnt: set[str] = set()
        self.lock = threading.Lock()


CONVERSATION_TAIL = 4
"""How many of the messages before a user's message tell its conversation apart (see
:func:`conversation_key`)."""


def conversation_key(before: Iterable[tuple[str | None, str]]) -> ConversationTail:
    """What tells the conversation of a user message apart, with no session id to go by (for
    :meth:`MemoryFlow.start`'s ``conversation``): a digest of the role and text of each of the
    last :data:`CONVERSATION_TAIL` messages ``before`` it, system and developer messages aside.
    Every call of one turn has the same (an agent's steps send the same history before the
    user's message; a chat engine's refine call changes only its system message, which holds
    the documents); two conversations whose users say the same words ("yes") differ in what
    came before. Only the last few, each on its own: a chat memory drops messages as a turn's
    tool results fill it, between two steps of the turn (the oldest, or all but the first), so
    a later step may have fewer, some of those its first step had."""
    said = [
        [role if isinstance(role, str) else None, text if isinstance(text, str) else ""]
        for role, text in before
        if role not in ("system", "developer")
    ]
    return tuple(_digest(message) for message in said[-CONVERSATION_TAIL:])


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()


def latest_index(messages: Sequence[M], is_user: Callable[[M], bool]) -> int | None:
    """Index of the last message for which ``is_user`` holds, or None."""
    for index in range(len(messages) - 1, -1, -1):
        if is_user(messages[index]):
            return index
    return None


REACT_STEP = "Thought:"
REACT_OBSERVATION = "Observation:"
REACT_RETRIES = (
    ("FAILURE: Your previous response was empty.", "You must output a thought and an action"),
    ("Error while parsing the output:", "The output should be in one of the following formats:"),
)
"""The prompts (a beginning, and a phrase further on) with which LlamaIndex's ``ReActAgent``
asks again, as a user message right after an answer it could not use."""


def _react_retry(text: str) -> bool:
    text = text.lstrip()
    return any(text.startswith(start) and later in text for start, later in REACT_RETRIES)


def _is_react_transcript(messages: Sequence[tuple[str | None, str]]) -> bool:
    """A system prompt that teaches ReAct's format (it names both the step and the observation),
    or an answer already written in it."""
    return any(
        (role in ("system", "developer") and REACT_STEP in text and REACT_OBSERVATION in text)
        or (role == "assistant" and text.lstrip().startswith(REACT_STEP))
        for role, text in messages
    )


CODEACT_CODE = "<execute>"
CODEACT_RESULT = "Result of executing the code given:"
"""A code-acting agent (LlamaIndex's ``CodeActAgent``) has the model write code between
``<execute>`` tags, runs it, and sends its output back as a user message that starts so."""


CONVERSATION_SUMMARY = "Here is a summary of the conversation to date:"
"""How LangChain's ``SummarizationMiddleware`` opens the user message that replaces the
conversation it summarised (which can hold what tools returned)."""

SUMMARY_REQUEST = "<messages>\nMessages to summarize:\n"
"""What the request in which ``SummarizationMiddleware`` asks a model to summarise the
conversation holds (its default prompt's marker, which LangChain keeps stable)."""


def harness_request(messages: Sequence[tuple[str | None, str]]) -> bool:
    """Whether ``(role, text)`` messages are a request an agent harness makes for its own work,
    not a turn of the conversation: LangChain's summary of the conversation so far
    (:data:`SUMMARY_REQUEST`). It gets no memory: the user's memories would go into the
    summary, and a memory block written from the transcript could hold what tools returned.
    Through a LangChain chat model the run's metadata says so (``lc_source``); a client
    wrapper sees only the messages."""
    return any(role == "user" and SUMMARY_REQUEST in text for role, text in messages)


def agent_observations(messages: Sequence[tuple[str | None, str]]) -> set[int]:
    """Indices, among ``(role, text)`` messages, of the user messages an agent wrote: tool
    output it sends back as if the user had. Those are never the user's words, and they make a
    call untrusted. They are:

    - ReAct observations: a ReAct agent (LlamaIndex's ``ReActAgent``, and others that use tools
      through text) writes each step as an assistant message "Thought: ...\nAction: ..." and
      gets the tool's output back as a user message "Observation: ..." (one or more right
      after the step);
    - the ReAct agent's retry prompts (:data:`REACT_RETRIES`, user messages right after an
      answer), which quote the model's unusable answer, in a ReAct transcript only: a user who
      pastes such an error into an ordinary chat is still the user;
    - a code-acting agent's code output (:data:`CODEACT_RESULT`) right after the assistant
      message with the code (:data:`CODEACT_CODE`): a fetched page, a file;
    - a conversation summary that replaced the earlier messages
      (:data:`CONVERSATION_SUMMARY`), which can hold what tools returned."""
    found: set[int] = set()
    after_step = after_answer = after_code = False
    react = _is_react_transcript(messages)
    for index, (role, text) in enumerate(messages):
        if role == "assistant":
            after_step, after_answer = text.lstrip().startswith(REACT_STEP), True
            after_code = CODEACT_CODE in text
        elif role == "user" and (
            (after_step and text.lstrip().startswith(REACT_OBSERVATION))
            or (react and after_answer and _react_retry(text))
            or (after_code and text.lstrip().startswith(CODEACT_RESULT))
            or text.lstrip().startswith(CONVERSATION_SUMMARY)
        ):
            found.add(index)
            after_code = False
        else:
            after_step = after_answer = after_code = False
    return found


MAX_EXTRACTED_CHARS = 60_000
"""The longest text of a turn's message (the user's, the answer) queued for background
extraction: a longer one keeps its start and its end, with a note of how much was left out
between them. At most ~15k tokens each for the extraction call (a whole pasted file could
overflow the model's context), and always within the queue's size limit for a job."""


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def clipped(text: str, limit: int = MAX_EXTRACTED_CHARS) -> str:
    """``text``, or its first and last ``limit // 2`` characters around a note of what was
    left out when it is longer than ``limit``; a lone surrogate (half an emoji, which some
    servers send) becomes U+FFFD, since the queue file holds UTF-8 and refused the turn."""
    text = _LONE_SURROGATE.sub("\ufffd", text)
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters left out ...]\n{text[-half:]}"


AGENT_STATE = ("Current state:\n", "\n\nCurrent message:\n")
"""LlamaIndex's default ``state_prompt`` (``DEFAULT_STATE_PROMPT``), before and after the
state: an agent with state (``AgentWorkflow(initial_state=...)``) sends the user's message as
``"Current state:\n{state}\n\nCurrent message:\n{msg}\n"``. Its tools can write anything in
the state (a fetched page)."""


def agent_state_message(text: str) -> str | None:
    """The user's message in ``text`` when an agent sent it with its state
    (:data:`AGENT_STATE`), else None. LlamaIndex wraps the message's last text block, so the
    state may follow earlier blocks: the message is the text before "Current state:" and what
    follows the last "Current message:" line. A state cannot put words after the user's, and
    one that holds that line itself leaves the user's message shorter, never longer."""
    start, message_line = AGENT_STATE
    at = text.find(start)
    if at < 0 or message_line not in text[at + len(start) :]:
        return None
    return text[:at] + text.rsplit(message_line, 1)[1].removesuffix("\n")


REACT_QUESTION = "Question:"
REACT_ACTIONS = ("Action:", "Action Input:")


def without_react_observations(text: str) -> str | None:
    """``text`` without what tools returned, when it holds ReAct steps itself, else None. A
    ReAct agent that works in one prompt (LangChain's ``create_react_agent``, a hand-written
    loop) sends its steps, the tools' output among them, inside the user message:
    "...Question: {input}\nThought: ...\nAction: ...\nAction Input: ...\nObservation:
    {tool output}\nThought: ...". It holds them when a line starting "Observation:" follows one
    starting "Action:" or "Action Input:".

    Left out: from each line starting "Observation:" to the end, with what the model wrote
    after it (which can repeat what it read). Once only, a line starting "Question:" ends an
    observation: a prompt teaches the format with an example observation before the user's
    question ("Observation: the result of the action ... Begin!\n\nQuestion: {input}")."""
    if REACT_OBSERVATION not in text:
        return None
    lines = text.splitlines(keepends=True)
    acted = holds = False
    for line in lines:
        start = line.lstrip()
        if start.startswith(REACT_ACTIONS):
            acted = True
        elif acted and start.startswith(REACT_OBSERVATION):
            holds = True
            break
    if not holds:
        return None
    kept: list[str] = []
    observing = reopened = False
    for line in lines:
        start = line.lstrip()
        if start.startswith(REACT_OBSERVATION):
            observing = True
        elif observing and not reopened and start.startswith(REACT_QUESTION):
            observing, reopened = False, True
        if not observing:
            kept.append(line)
    return "".join(kept)


def user_words(text: str) -> str:
    """What the user wrote in their message ``text``: without an agent's state around it
    (:func:`agent_state_message`) or the ReAct steps written into it
    (:func:`without_react_observations`). A call whose user message carries either is
    untrusted (:func:`holds_agent_text`)."""
    message = agent_state_message(text)
    message = text if message is None else message
    steps = without_react_observations(message)
    return message if steps is None else steps


def holds_agent_text(text: str) -> bool:
    """Whether a user message ``text`` carries text an agent put in it: its state, or tools'
    output in ReAct steps (see :func:`user_words`)."""
    return agent_state_message(text) is not None or without_react_observations(text) is not None


def insert_before(messages: Sequence[M], index: int, message: M) -> list[M]:
    """A new list with ``message`` just before ``messages[index]``; the prefix is unchanged, so
    the provider's prompt caching keeps working."""
    return [*messages[:index], message, *messages[index:]]


class MemoryFlow:
    """Memory around model calls for one user.

    Args:
        memory: The user's store.
        jobs: Where storing and extraction work goes (a :class:`~.writer.MemoryWriter`).
        inline: True to have the model write the memory block in its answer (no extra call);
            False to leave answers untouched and extract with a separate call in the background.
        top_k: Memories injected at most.
        untrusted_context: Treat every call as holding untrusted content (for applications that
            put retrieved documents in the prompt): see :mod:`.grounding`.
        kept_turns: The turns an earlier flow of the same user kept (:attr:`kept_turns`), to
            go on with; default: none.
    """

    def __init__(
        self,
        memory: MemoryStore,
        jobs: MemoryJobs,
        *,
        inline: bool,
        top_k: int = 5,
        untrusted_context: bool = False,
        kept_turns: KeptTurns | None = None,
    ) -> None:
        self.memory = memory
        self.jobs = jobs
        self.inline = inline
        self.top_k = top_k
        self.untrusted_context = untrusted_context
        self._last_extracted: str | None = None  # the user message last queued for extraction
        self.kept_turns = KeptTurns() if kept_turns is None else kept_turns
        self._turns = self.kept_turns.turns
        self._learnt = self.kept_turns.learnt
        self._turns_lock = self.kept_turns.lock

    def start(
        self,
        user_text: str | None,
        *,
        instruct: bool = True,
        model: str | None = None,
        untrusted: bool = False,
        previous_text: str | None = None,
        tool_loop_step: bool = False,
        later_step: bool = False,
        conversation: str | ConversationTail | None = None,
        begins_turn: bool = True,
    ) -> Turn:
        """Prepare a call whose latest user message says ``user_text``. Never raises.

        Args:
            user_text: The latest user message's text (None or blank: nothing to search with).
            previous_text: The user message before it, if any: a short follow-up is searched
                with it ("which one for it?"; ``MemoryStore.search``'s ``previous_message``).
            instruct: False when the answer must stay machine-readable (JSON, a forced tool
                call): memories are injected but the inline instruction is not added.
            model: The model's name, for background extraction.
            untrusted: The call's messages hold tool results or documents (text the user did
                not write): only memories grounded in the user's text are kept.
            tool_loop_step: Tool results follow the latest user message (a tool loop's later
                step): background extraction does not queue it again when the extraction this
                flow queued last was of the same message (its first step).
            later_step: The call may be a later one of the turn of its user message (messages
                follow that message: an agent's tool calls and their results; or it refines
                an answer already written). When this flow prepared a call for the same message
                of the same ``conversation`` already, this one is a later call of that turn
                (:attr:`Turn.later_call`): it gets the memories that call got, not those learnt
                since from this very message (which the model would be shown as if from an
                earlier conversation), unless one of them was deleted or changed meanwhile (a
                tool that forgets): then the memories are recalled anew. A turn is learnt from
                once: once an earlier call's answer carried the memory block, a later call gets
                no instruction (a first call answered with a bare tool call carried none: the
                next one is instructed). A new turn with the same words (a user who says "yes"
                twice) is not a later step: it is recalled for and learnt from anew.
            conversation: Which conversation the call is of, for ``later_step``: a session's
                id (or the user message's own, where a framework gives messages lasting ids,
                as LangGraph does), or :func:`conversation_key` of the messages before the
                user's. With no
                turn of the same message and messages before it, a later step whose messages
                before the user's are what is left of a kept turn's, some dropped (by a chat
                memory the tool results filled: the oldest, or all but the first), is a later
                call of that turn when it is the only one they fit (with none left: the only
                recent turn of the same message).
            begins_turn: The call may be the first of a turn: the user's own message, not one
                of a framework's prompts (a query engine's, a question condensed from the
                chat, a completion prompt), which no later step follows. Only such calls are
                kept for the turn's later calls (a digest of the turn, with what it recalled:
                never the prompt's text).
        """
        turn = Turn(
            user_text=(user_text or "").strip() or None,
            model=model,
            untrusted=untrusted or self.untrusted_context,
            tool_loop_step=tool_loop_step,
        )
        try:
            parts = []
            learnt = False  # an earlier call of the turn carried the block
            if turn.user_text:
                said = _digest(turn.user_text)
                tail = conversation if isinstance(conversation, tuple) else None
                key = _digest([conversation if tail is None else list(tail), turn.user_text])
                with self._turns_lock:
                    if later_step:
                        key = self._turn_of(key, said, tail)
                    kept = self._turns.get(key) if later_step else None
                    learnt = kept is not None and key in self._learnt
                earlier = None if kept is None else kept.recalled
                turn.later_call = kept is not None
                recalled = self._recall_in_time(turn.user_text, previous_text, earlier)
                if begins_turn or turn.later_call:
                    turn.turn_key = key
                    kept = _KeptTurn(said, tail if kept is None else kept.tail, recalled)
                    self._remember_turn(key, kept, new=not turn.later_call)
                context, turn.injected = recalled.context, dict(recalled.injected)
                parts += [context] if context else []
            if self.inline and instruct and not learnt:
                turn.nonce = new_nonce()
                parts.append(extraction_instruction(turn.nonce, allow_replace=bool(turn.injected)))
            turn.prompt = "\n\n".join(parts) or None
        except Exception:
            self.failed("inject_failures", "could not prepare memories; calling without them")
            turn.prompt, turn.nonce, turn.injected = None, None, {}
        return turn

    def _recall_in_time(
        self, query: str, previous: str | None, earlier: _Recalled | None = None
    ) -> _Recalled:
        """The context block of the memories relevant to ``query``, the user's message after
        ``previous``, and the short label of each memory in it, by id ("" and none if there
        are none, or on failure), once the user's queued writes are stored: ``earlier``'s, what
        an earlier call of the turn was shown, when those memories are all still there
        unchanged (not replaced by a correction that call's block queued); else searched.
        Within :func:`recall_seconds`. A failure is logged and counted once: the search's
        own, or the deadline's when the search has not ended by then (the search failing
        later, as the deadline cuts its requests short, is not counted again); and once per
        turn: not again when ``earlier``'s failed too (an agent asks after each tool call).
        An outage of the storage or the embedder is one WARNING line, its traceback at DEBUG;
        any other error's traceback is logged with it."""
        counted = _Once()
        if earlier is not None and earlier.failed:
            counted.first()  # the turn's failure is counted already, by its earlier call

        def count(message: str, exc_info: bool) -> None:
            if counted.first():
                self.failed("inject_failures", message, exc_info=exc_info)
            else:
                log.debug("%s (counted already for this turn)", message)

        failed = _Recalled("", {}, None, failed=True)
        nothing = _Recalled("", {}, None)
        if not has_visible_text(query):  # a lone zero-width space: nothing to search with
            return nothing

        def recall() -> _Recalled:
            self.jobs.settle(self.memory)  # (a correction an earlier call's block queued)
            if earlier is not None and self._unchanged(earlier):
                return earlier
            # cut here, within the time: a long run of invisible characters at the end of
            # the message takes a while to cut off
            text = search_text(query)
            if text is None:
                return nothing
            try:
                found = self.memory.search(
                    text,
                    top_k=self.top_k,
                    chat_message=True,
                    previous_message=previous,
                )
            except (StorageError, EmbeddingError) as exc:
                # without its traceback: the cause it chains (a panic's text may quote the
                # user's message) is logged at DEBUG only
                log.debug("could not search memories", exc_info=True)
                count(f"could not search memories ({exc}); answering without them", False)
                return failed
            except Exception:
                count("could not search memories; answering without them", True)
                return failed
            labelled = [(label, m) for label, (m, _) in zip(short_ids(len(found)), found)]
            return _Recalled(
                format_memory_context(labelled),
                {label: m.id for label, m in labelled},
                _as_shown(m for _, m in labelled),
            )

        try:
            return in_recall_time(self.memory, recall, "recall memories")
        except DeadlineExceeded as exc:
            count(f"{exc}; calling without memories", False)
            return failed

    def _turn_of(self, key: str, said: str, tail: ConversationTail | None) -> str:
        """The key of the kept turn a later step is of (the turns' lock held): ``key`` when
        kept; else the latest kept turn of the same message (digest ``said``) if it is the
        only one whose messages before it the call's (``tail``) are left of, some dropped;
        else ``key``. (An older turn in the same words is not the one a step continues: a
        window that keeps the first message and the latest ones left an old turn's step that
        looked like it.)"""
        if key in self._turns or tail is None:
            return key
        same = [k for k, kept in self._turns.items() if kept.said == said]
        fits = [k for k in same if self._turns[k].trimmed_to(tail)]
        return fits[0] if len(fits) == 1 and fits[0] == same[-1] else key

    def _remember_turn(self, key: str, kept: _KeptTurn, new: bool) -> None:
        """Keep what a turn's call recalled, for its later calls (a ``new`` turn is not learnt
        from yet); the oldest turns kept are let go."""
        with self._turns_lock:
            self._turns[key] = kept
            self._turns.move_to_end(key)
            if new:
                self._learnt.discard(key)
            while len(self._turns) > REMEMBERED_TURNS:
                self._learnt.discard(self._turns.popitem(last=False)[0])

    def _unchanged(self, recalled: _Recalled) -> bool:
        """Whether the memories ``recalled`` showed are all still there, unchanged (False when
        they cannot be read)."""
        if recalled.shown is None:
            return False
        ids = [shown[0] for shown in recalled.shown]
        try:
            return not ids or _as_shown(self.memory.get_many(ids)) == recalled.shown
        except Exception:
            return False

    def strip(self, turn: Turn, answer: str) -> str:
        """``answer`` without its memory block, storing nothing (for extra choices)."""
        if not turn.nonce or not isinstance(answer, str):
            return answer
        return parse_memory_block(answer, turn.nonce).visible

    def finish(self, turn: Turn, answer: str | None, *, tool_call: bool = False) -> str | None:
        """A whole answer came back: return what the caller may see (the block cut out) and
        queue the memory work. Never raises; on failure the answer is returned stripped or as is.

        Args:
            tool_call: The answer called a tool. With no text besides (``None`` or ``""``), it
                has no block to miss (as :meth:`AnswerStream.finish` treats a streamed one).
        """
        try:
            if turn.nonce:
                if not isinstance(answer, str) or (tool_call and not answer):
                    return answer  # a tool call: no text, no block
                parsed = parse_memory_block(answer, turn.nonce)
                self.finish_inline(
                    turn,
                    parsed.memories,
                    parsed.problem,
                    parsed.block_found,
                    parsed.dropped,
                    parsed.foreign_blocks,
                )
                return parsed.visible
            self.finish_background(turn, answer)
        except Exception:
            self.failed("store_failures", "could not process the answer's memories")
            return self.strip(turn, answer) if isinstance(answer, str) else answer
        return answer

    def stream(self, turn: Turn, *, remember: bool = True) -> AnswerStream:
        """A filter for the answer's text deltas (see :class:`AnswerStream`)."""
        return AnswerStream(self, turn, remember=remember)

    def finish_inline(
        self,
        turn: Turn,
        memories: Sequence[ExtractedMemory],
        problem: str | None,
        block_found: bool,
        dropped: int = 0,
        foreign_blocks: int = 0,
    ) -> None:
        """Queue the memories of an inline block for storing; count what was wrong with it
        (``malformed_blocks``, ``missing_blocks``, ``dropped_entries``, ``foreign_blocks`` in
        ``stats()``)."""
        if dropped:
            self.memory.counters["dropped_entries"] += dropped
        if foreign_blocks:
            self.memory.counters["foreign_blocks"] += foreign_blocks
            log.info(
                "%d memory blocks of another nonce hidden (user %s)", foreign_blocks, self._user()
            )
        if problem:
            self.memory.counters["malformed_blocks"] += 1
            log.info("memory block problem (user %s): %s", self._user(), problem)
        elif not block_found and not foreign_blocks:
            self.memory.counters["missing_blocks"] += 1
        if block_found and not problem and turn.turn_key:  # its later calls: no instruction
            with self._turns_lock:
                if turn.turn_key in self._turns:
                    self._learnt.add(turn.turn_key)
        if turn.untrusted:  # (its "replaces" not followed, its keys not kept: grounding.py)
            kept = [m for m in memories if grounded(m.text, turn.user_text or "")]
            if len(kept) < len(memories):
                self.memory.counters["ungrounded_memories"] += len(memories) - len(kept)
                log.info(
                    "dropped %d ungrounded memories (user %s)",
                    len(memories) - len(kept),
                    self._user(),
                )
            memories = kept
        if not memories:
            return
        replaces = replaced_ids(memories, {} if turn.untrusted else turn.injected)
        items = [
            {
                "text": m.text,
                "category": m.category.value,
                "replaces": r,
                **({"keys": list(m.keys)} if m.keys and not turn.untrusted else {}),
            }
            for m, r in zip(memories, replaces)
        ]
        self._queue(lambda: self.jobs.store(self.memory, items))

    def finish_background(self, turn: Turn, answer: str | None) -> None:
        if self.inline or not turn.user_text:
            return
        user_text = turn.user_text
        if turn.tool_loop_step and self._last_extracted == user_text:
            return  # a tool loop's later step: its first queued the message
        exchange = [{"role": "user", "content": clipped(user_text)}]
        if answer:
            exchange.append({"role": "assistant", "content": clipped(answer)})

        def extract() -> None:
            queued = self.jobs.extract(
                self.memory, exchange, turn.injected, turn.model, turn.untrusted
            )
            self._last_extracted = user_text if queued else None

        self._queue(extract)

    def _queue(self, work: Callable[[], None]) -> None:
        """Queue memory work now, or, inside :func:`queued_later`, keep it for later."""
        later = _later.get()
        if later is None or later.closed:  # (a task started in the block, ending after it)
            work()
            return

        def guarded() -> None:
            try:
                work()
            except Exception:
                self.failed("store_failures", "could not queue the answer's memories")

        later.append(guarded)

    def failed(self, counter: str, message: str, *, exc_info: bool = True) -> None:
        """Count and log a failure the call survives."""
        self.memory.survived(counter, message, exc_info=exc_info)

    def _user(self) -> str:
        return user_tag(self.memory.user_id)


class _Once:
    """True for the first :meth:`first` asked, from any thread; False after."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken = False

    def first(self) -> bool:
        with self._lock:
            taken, self._taken = self._taken, True
        return not taken


class _Later(list[Callable[[], None]]):
    """Memory work kept by :func:`queued_later`; ``closed`` once its block has ended."""

    closed = False


_later: contextvars.ContextVar[_Later | None] = contextvars.ContextVar(
    "headroom_memory_queued_later", default=None
)


@contextmanager
def queued_later() -> Iterator[list[Callable[[], None]]]:
    """The memory work the flows queue inside the block (a finished answer's: a write to the
    job queue file) is kept in the list this yields instead: an async caller on the event
    loop's thread runs it off the loop with :func:`run_queued`. Work of a thread or task
    started inside the block (which copies the context) is kept there too."""
    later = _Later()
    token = _later.set(later)
    try:
        yield later
    finally:
        _later.reset(token)
        later.closed = True


async def run_queued(later: list[Callable[[], None]]) -> None:
    """Run the work :func:`queued_later` kept, in a thread, off the event loop."""
    if later:
        work = list(later)
        later.clear()
        await finished_in_thread(lambda: [each() for each in work])


FINISH_WAIT_SECONDS = 2.0
"""How long a cancelled async call waits for its answer's memory work (section 12 of the
reliability page: it takes at most ``QUEUE_WAIT_SECONDS`` to reach the writer)."""


async def finished_in_thread(work: Callable[..., R], *args: Any) -> R:
    """``await asyncio.to_thread(work, *args)`` for a finished answer's memory work, which a
    cancellation does not leave running behind the caller's back: the caller's
    ``CancelledError`` waits for it (at most :data:`FINISH_WAIT_SECONDS`). Cancelling an await
    does not stop its thread, so a ``forget_user()`` the application makes once the cancelled
    call is over missed a turn still on its way to the writer, and the turn was learned after
    the user was forgotten."""
    running = asyncio.ensure_future(asyncio.to_thread(work, *args))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        running.add_done_callback(_retrieved)  # first: a second cancellation ends the wait
        await asyncio.wait({running}, timeout=FINISH_WAIT_SECONDS)
        raise


def _retrieved(done: asyncio.Future[Any]) -> None:
    """Take a finished future's error, so that asyncio does not log it as never retrieved
    (the work's own failures are counted and logged where they happen)."""
    if not done.cancelled():
        done.exception()


class AnswerStream:
    """An answer's text, delta by delta: no returned piece contains any part of the memory block.

    Feed each text delta to :meth:`feed` and show what it returns; when the answer is over, show
    what :meth:`finish` returns (text that was held back in case it started a tag). ``finish``
    queues the memory work once (with ``remember=False``, for extra choices, it stores nothing).
    In the background mode, text passes through unchanged and is collected for extraction.
    Never raises.
    """

    def __init__(self, flow: MemoryFlow, turn: Turn, *, remember: bool = True) -> None:
        self._flow = flow
        self._turn = turn
        self._remember = remember
        self._filter = MemoryStreamFilter(turn.nonce) if turn.nonce else None
        self._answer: list[str] = []
        self._tail: str | None = None
        self._fed = False  # any text at all

    def feed(self, delta: str | None) -> str:
        if not delta:
            return ""
        self._fed = True
        if self._filter is None:
            self._answer.append(delta)
            return delta
        try:
            return self._filter.feed(delta)
        except Exception:
            self._flow.failed("store_failures", "could not filter a streamed answer")
            self._filter = None  # fail open: the rest streams unfiltered rather than not at all
            return delta

    def finish(self, *, tool_call: bool = False) -> str:
        """The text still held back ("" if none). Calling it again returns "".

        Args:
            tool_call: The answer called a tool. With no text besides, it has no block to
                miss (as :meth:`MemoryFlow.finish` treats a whole one).
        """
        if self._tail is not None:
            return ""
        self._tail = ""
        try:
            if self._filter is not None:
                result = self._filter.finish()
                self._tail = result.tail
                if self._remember and (self._fed or not tool_call):
                    self._flow.finish_inline(
                        self._turn,
                        result.memories,
                        result.problem,
                        result.answer.block_found,
                        result.answer.dropped,
                        result.answer.foreign_blocks,
                    )
            elif self._remember:
                self._flow.finish_background(self._turn, "".join(self._answer))
        except Exception:
            self._flow.failed("store_failures", "could not finish a streamed answer")
        return self._tail


class ItemEditor(Protocol):
    """Edits a stream's items (chat completion chunks, Responses events, LangChain chunks,
    LlamaIndex responses) one by one, for :func:`edited` and :func:`aedited`."""

    def edit(self, item: Any) -> list[Any]:
        """What to show for ``item``: itself (edited), nothing, or held-back text first."""
        ...

    def end(self) -> list[Any]:
        """The stream is over: queue the memory work; any last items to show."""
        ...

    def abandon(self) -> None:
        """The stream did not come to its end (the caller stopped reading it, or it failed):
        queue nothing more and count nothing, as for a call that failed."""
        ...


def edited(
    items: Iterable[Any], editor: ItemEditor, *, finish_on_error: bool = False
) -> Generator[Any, None, None]:
    """``items`` as ``editor`` shows them; the one rule, for every wrapper and adapter, of how
    a stream ends.

    Read to its end, the stream is finished (:meth:`ItemEditor.end`: its memory work queued).
    Left before its end, it is abandoned (:meth:`ItemEditor.abandon`): the caller stopped
    reading (``break``, ``close()``, the generator let go of), or raised into it. That is not
    the model's doing: an answer whose end had not come stores nothing, is not extracted and
    is not counted as a missing or malformed block.

    Args:
        finish_on_error: What an error (an ``Exception``) raised by ``items`` themselves, the
            model's own stream failing midway, does: False, the stream is abandoned (the OpenAI
            wrappers); True, the answer is finished as far as it came before the error goes on
            to the caller (the LangChain and LlamaIndex adapters), if any of it came: a request
            that failed before its first item (a 429, a 500) is abandoned, not counted as an
            answer without its memory block.
    """
    ended = answered = False
    try:
        source = iter(items)
        while True:
            try:
                item = next(source)
            except StopIteration:
                break
            except Exception:
                if finish_on_error and answered:
                    ended = True
                    editor.end()
                raise
            answered = True
            yield from editor.edit(item)  # the caller's leaving is raised here
        ended = True
        yield from editor.end()
    finally:
        if not ended:
            editor.abandon()
            close_quietly(items)


def close_quietly(items: object) -> None:
    """Close a stream left before its end, now: openai's ``Stream`` holds itself in a cycle, so
    left to the garbage collector its HTTP response was closed whenever a collection ran, even
    inside the same client's next request, which holds the connection pool's lock that the
    close takes (a hang)."""
    close = getattr(items, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # never in the way of how the stream was left
            log.debug("closing a stream left early failed", exc_info=True)


async def aclose_quietly(items: object) -> None:
    """The async form of :func:`close_quietly` (``aclose()`` or an async ``close()``)."""
    close = getattr(items, "aclose", None) or getattr(items, "close", None)
    if callable(close):
        try:
            closing = close()
            if inspect.isawaitable(closing):
                await closing
        except Exception:  # never in the way of how the stream was left
            log.debug("closing a stream left early failed", exc_info=True)


async def aedited(
    items: AsyncIterable[Any],
    editor: ItemEditor,
    *,
    finish_on_error: bool = False,
    end_in_thread: bool = False,
) -> AsyncGenerator[Any, None]:
    """The async form of :func:`edited` (``aclose()``, a cancelled task and a loop shutting
    down leave the stream as ``close()`` does, and a stream left early is closed at once).

    Args:
        end_in_thread: Finish the stream (:meth:`ItemEditor.end`: its memory work, a write
            to the job queue file) in a worker thread, off the event loop. An item that
            finishes the answer (a chunk with a finish reason, the Responses API's final
            event) has its memory work queued in a thread too (:func:`queued_later`), before
            the item is shown.
    """
    ended = answered = False
    try:
        source = aiter(items)
        while True:
            try:
                item = await anext(source)
            except StopAsyncIteration:
                break
            except Exception:
                if finish_on_error and answered:
                    ended = True
                    await finished_in_thread(editor.end) if end_in_thread else editor.end()
                raise
            answered = True
            with queued_later() as later:  # an item may finish the answer (a last chunk)
                edited_items = editor.edit(item)
            if later:
                await run_queued(later)
            for shown in edited_items:
                yield shown  # the caller's leaving is raised here
        ended = True
        last = await finished_in_thread(editor.end) if end_in_thread else editor.end()
        for shown in last:
            yield shown
    finally:
        if not ended:
            editor.abandon()
            await aclose_quietly(items)
