"""Every background extraction call is bounded (writer.EXTRACTION_CALL_TIMEOUT), whatever the
model object: here a real ChatOpenAI with a long timeout of its own, over HTTP to the scripted
server, whose first extraction answer stalls."""

from __future__ import annotations

import json
import threading
import time

from _langgraph_support import chat_model, is_extraction

import headroom_memory_integrations.writer as writer
from headroom_memory_integrations.langchain import HeadroomMemory
from headroom_memory_integrations.testing import Reply

JAZZ = {"text": "Likes jazz", "category": "preference"}


def test_a_stalled_extraction_call_is_given_up_and_retried(
    openai_server, db_path, model, monkeypatch
) -> None:
    monkeypatch.setattr(writer, "EXTRACTION_CALL_TIMEOUT", 1.0)
    tries: list[float] = []

    def respond(body: dict) -> Reply:
        if is_extraction(body):
            tries.append(time.monotonic())
            reply = Reply.text(json.dumps({"memories": [JAZZ]}))
            if len(tries) > 1:
                return reply
            # the first try has its 1 s deadline: the next one, meant to succeed, is given
            # 120 s (a shared machine may stall it past 1 s)
            monkeypatch.setattr(writer, "EXTRACTION_CALL_TIMEOUT", 120.0)
            return reply.delayed(300.0)
        return Reply.text("Noted.")

    openai_server.responder = respond
    memory = HeadroomMemory(
        user_id="bob",
        db_path=db_path,
        embedder=model,
        llm=chat_model(openai_server, timeout=600),  # its own timeout would come too late
    )
    memory.save_context({"input": "I like jazz"}, {"output": "Noted."})
    started = time.monotonic()
    assert memory.memory.flush(120)
    assert time.monotonic() - started < 60  # not the 300 s the first answer takes
    assert [m.text for m in memory.memory.get_all()] == ["Likes jazz"]
    assert len(tries) == 2 and tries[1] - tries[0] < 60
    stats = memory.memory.stats()
    assert stats["background"]["retried"] == 1 and stats["events"]["extraction_timeouts"] == 1
    # the abandoned call still waits for its answer on a thread of its own
    abandoned = [t for t in threading.enumerate() if t.name == "headroom-memory extraction call"]
    assert abandoned and all(t.daemon for t in abandoned)


def test_work_whose_thread_cannot_start_runs_on_the_callers(monkeypatch) -> None:
    """Python 3.12.0 to 3.12.2 refuse a new thread while the exit drains the job queue
    ("can't create new thread at interpreter shutdown"): the extraction then runs on the
    draining thread, without its deadline, instead of failing until the turn is lost."""
    from headroom_memory_integrations.storage.guard import run_for_at_most

    def refuse(self) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    ran: list[str] = []
    thread, failure = run_for_at_most(lambda: ran.append(threading.current_thread().name), 5, "x")
    assert ran == [threading.current_thread().name] and failure == []
    assert not thread.is_alive()
    _, failure = run_for_at_most(lambda: 1 / 0, 5, "x")
    assert [type(exc) for exc in failure] == [ZeroDivisionError]  # re-raised by the caller
