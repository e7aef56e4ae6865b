"""What the suite's own set-up in conftest.py promises."""

from __future__ import annotations

import ast
import gc
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest


class _Finalized:
    """Garbage whose finalizer runs Python code: a collection inside ``ast.parse`` then lets
    another thread run, as the suite's background threads do."""

    def __init__(self) -> None:
        self.cycle = self

    def __del__(self) -> None:
        sum(range(200))


def test_threads_parsing_at_once_do_not_break_each_others_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without conftest's lock, Python 3.11 raised SystemError (AST constructor recursion depth
    mismatch) in about one parse in five here: pytest showing a failure while a worker thread
    logs a traceback is such a pair, and it ended a CI run with an INTERNALERROR.

    This tests the lock, not its way out of a hang: here a thread may wait for the others'
    parses for as long as the machine is slow (over 10 s on a loaded CI machine, when it went
    on without the lock and the race came back), so the wait is raised beyond this test's."""
    import conftest

    monkeypatch.setattr(conftest, "PARSE_LOCK_WAIT", 600.0)
    switch_interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    source = Path(ast.__file__).read_text(encoding="utf-8")
    errors: list[BaseException] = []

    def parse_at_depth(depth: int) -> None:
        if depth:
            return parse_at_depth(depth - 1)
        for _ in range(15):
            for _ in range(50):
                _Finalized()
            try:
                ast.parse(source)
            except SystemError as exc:
                errors.append(exc)

    sys.setswitchinterval(1e-6)
    gc.set_threshold(50, 1, 1)
    try:
        threads = [threading.Thread(target=parse_at_depth, args=(d,)) for d in (0, 60, 120)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 300
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    finally:
        sys.setswitchinterval(switch_interval)
        gc.set_threshold(*thresholds)
    assert not [thread for thread in threads if thread.is_alive()]  # every parse was made
    assert errors == []


_TWO_TESTS_ON_ONE_ADDRESS = """
import asyncio
from langchain_openai import ChatOpenAI
from headroom_memory_integrations.testing import ScriptedOpenAIServer

SERVER = ScriptedOpenAIServer().start()  # one address for both tests, as a reused port gives


def ask() -> str:
    model = ChatOpenAI(model="m", base_url=SERVER.base_url, api_key="sk-x", max_retries=0)
    return asyncio.run(model.ainvoke("hi")).text


def test_first():
    assert ask() == "OK"
    SERVER._httpd.drop_connections()  # as the server of a finished test does


def test_second():
    assert ask() == "OK"
"""


def test_a_test_never_gets_a_connection_left_on_an_earlier_tests_closed_loop(tmp_path) -> None:
    """conftest's autouse fixture, run as a plugin of a pytest of two tests: the second failed
    with "Event loop is closed" when langchain-openai's shared client outlived the first."""
    (tmp_path / "test_two.py").write_text(_TWO_TESTS_ON_ONE_ADDRESS)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "conftest",
            "-p",
            "no:cacheprovider",
            "test_two.py",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        # conftest, and the repository's root, which it imports benchmarks from
        env={**os.environ, "PYTHONPATH": os.pathsep.join(map(str, Path(__file__).parents[:2]))},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 passed" in run.stdout


STARTS_A_SERVER = """
import sys, time
from pathlib import Path
from benchmarks.common import ChromaServer
server = ChromaServer(Path(sys.argv[1]))
print(server.process.pid, flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie nobody has reaped yet does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_chroma_server_stops_when_the_process_that_started_it_is_killed(tmp_path) -> None:
    """A test run or benchmark killed by a signal (a timeout, a CI job cancelled) left its
    `chroma run` servers running for good."""
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTS_A_SERVER, str(tmp_path / "chroma")],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert starter.stdout is not None
    server = int(starter.stdout.readline())
    try:
        assert _running(server)
        starter.kill()
        starter.wait(30)
        deadline = time.monotonic() + 30
        while _running(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(server), "the server outlived the process that started it"
    finally:
        if _running(server):
            os.kill(server, 9)
