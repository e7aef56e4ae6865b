"""Server mode: several clients (and processes) share memories on a real `chroma run`."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from _reliability_support import wait_for

from headroom_memory_integrations import ChromaStorage, MemoryStore, StorageError

pytestmark = pytest.mark.server


def test_two_clients_share_one_server(server_storages, chroma_server, model) -> None:
    writer = MemoryStore("srv-alice", storage=server_storages(), embedder=model)
    reader = MemoryStore("srv-alice", storage=server_storages(), embedder=model)
    writer.add("Prefers Python for backend work", category="preference")
    assert (
        reader.search("Which language for the backend?")[0].memory.text
        == "Prefers Python for backend work"
    )
    assert reader.stats()["storage"] == chroma_server.url
    reader.clear()
    assert writer.get_all() == []
    writer.add("Prefers Go now")
    assert [m.text for m in reader.get_all()] == ["Prefers Go now"]


def test_a_rewrite_by_another_client_is_returned_at_once(server_storages, model) -> None:
    """With a server, other clients write too: records are read afresh, never cached."""
    writer = MemoryStore("srv-carol", storage=server_storages(), embedder=model)
    reader = MemoryStore("srv-carol", storage=server_storages(), embedder=model)
    memory = writer.add("Plays the cello")
    assert reader.search("Which instrument do I play?")[0].memory.text == "Plays the cello"
    writer.update(memory.id, "Plays the cello and the viola")
    assert reader.get(memory.id).text == "Plays the cello and the viola"
    found = reader.search("Which instrument do I play?")[0].memory
    assert found.text == "Plays the cello and the viola"


def test_a_second_process_sees_writes_at_once(chroma_server, model) -> None:
    store = MemoryStore("srv-bob", db_path=chroma_server.url, embedder=model)
    store.add("Is a vegetarian")
    code = f"""
        from headroom_memory_integrations import MemoryStore
        store = MemoryStore("srv-bob", db_path={chroma_server.url!r})
        print([m.text for m in store.get_all()])
        store.add("Lives in Lisbon")
        """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr
    assert "Is a vegetarian" in out.stdout
    assert {m.text for m in store.get_all()} == {"Is a vegetarian", "Lives in Lisbon"}


def test_closing_a_storage_stops_its_read_ahead(server_storages, model) -> None:
    storage = server_storages()
    store = MemoryStore("srv-erin", storage=storage, embedder=model)
    store.add("Plays the cello")
    collection = store._open()
    storage.close()
    assert collection._retired and collection._cache == {}
    collection._warm_after = 0.0
    collection._start_warming()  # a retired handle never reads ahead again
    assert collection._warm_after == 0.0


def test_users_are_isolated_on_the_server(server_storage, model) -> None:
    for i in range(5):
        MemoryStore(f"srv-user-{i}", storage=server_storage, embedder=model).add(
            f"Badge number {i}"
        )
    for i in range(5):
        found = MemoryStore(f"srv-user-{i}", storage=server_storage, embedder=model).search(
            "badge", min_score=-1
        )
        assert [m.text for m, _ in found] == [f"Badge number {i}"]


def test_unreachable_server_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match=r"127\.0\.0\.1:9"):
        MemoryStore("x", db_path="http://127.0.0.1:9").add("never stored")


def test_bad_server_url() -> None:
    with pytest.raises(StorageError, match="not a Chroma server URL"):
        ChromaStorage.from_url("ftp://example")


def test_a_storage_dropped_unclosed_lets_go_of_its_client(chroma_server, model) -> None:
    """An application that makes a storage per request and never closes it: once the storage
    is unreachable it is collected (the read-ahead of its users does not keep it) and its
    client closed, so its connections are not held until the process ends."""
    import gc
    import weakref

    from headroom_memory_integrations.storage import chroma

    storage = ChromaStorage.from_url(chroma_server.url)
    store = MemoryStore("srv-dropped", storage=storage, embedder=model)
    store.add("Keeps bees on the roof")
    assert store.search("Which animals do I keep?")  # Chroma answers: read ahead after it
    for thread in list(chroma._warmers):
        thread.join(timeout=30)
    assert any(h._storage is storage for h in chroma._read_aheads.held())  # read ahead
    client = storage._client
    collected = weakref.ref(storage)
    del store, storage

    def let_go() -> bool:
        gc.collect()
        return collected() is None

    wait_for(let_go)  # a thread still ending may hold it a moment longer (60 s at most)
    assert client._closed
    assert not any(h._user_id == "srv-dropped" for h in chroma._read_aheads.held())


def test_closing_a_server_storage_closes_its_connections(chroma_server) -> None:
    """chromadb's client, closed, leaves its HTTP sessions (its own and its admin client's)
    open: a socket per storage, reported as a ResourceWarning once collected. Closing the
    storage closes them."""
    from conftest import HashEmbedder

    storage = ChromaStorage.from_url(chroma_server.url)
    MemoryStore("closing-check", storage=storage, embedder=HashEmbedder()).add("Plays the cello")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        storage.close()
        del storage
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_storages_sent_other_headers_are_other_places_with_queues_of_their_own(
    chroma_server, openai_server, tmp_path, monkeypatch
) -> None:
    """A server (or a gateway before it) may serve each auth token another tenant's
    database: storages that send other headers are other places, with default queue files
    of their own, and a wrapper on one is refused the other's queue file (before: both were
    the bare URL, so they shared a queue and a turn of A's "alice" could be stored in B's).
    The same headers are the same place; no headers keep the file named after the URL alone
    (what earlier versions named it: its jobs are found again). No header value is shown."""
    import hashlib

    from conftest import HashEmbedder

    from headroom_memory_integrations.errors import InvalidInputError
    from headroom_memory_integrations.openai import with_fast_memory
    from headroom_memory_integrations.writer import _same_place, queue_path_for

    monkeypatch.setenv("HOME", str(tmp_path))
    token_a, token_b = "token-of-tenant-a-3f9c", "token-of-tenant-b-77e1"
    host, port = "127.0.0.1", chroma_server.port
    a = ChromaStorage.connect(host, port, headers={"X-Chroma-Token": token_a})
    a_again = ChromaStorage.connect(host, port, headers={"x-chroma-token": token_a})
    b = ChromaStorage.connect(host, port, headers={"X-Chroma-Token": token_b})
    bare, from_url = ChromaStorage.connect(host, port), ChromaStorage.from_url(chroma_server.url)
    storages = (a, a_again, b, bare, from_url)
    try:
        options = {"embedder": HashEmbedder()}
        wrapped = {
            name: with_fast_memory(openai_server.client(), "alice", storage=storage, **options)
            for name, storage in zip(("a", "a_again", "b", "bare", "from_url"), storages)
        }
        for client in wrapped.values():  # each reaches the server, its headers sent
            client.memory.add("Drinks green tea")
        queue = {name: queue_path_for(client.memory) for name, client in wrapped.items()}

        assert a.place != b.place and not _same_place(a, b)
        assert queue["a"] != queue["b"]
        assert a.place == a_again.place and queue["a"] == queue["a_again"]
        assert bare.place == from_url.place == chroma_server.url
        url_digest = hashlib.sha256(chroma_server.url.encode()).hexdigest()[:16]
        assert queue["bare"] == queue["from_url"]
        assert queue["bare"] == tmp_path / ".headroom-memory" / f"jobs-{url_digest}.sqlite3"
        assert len({queue["a"], queue["b"], queue["bare"]}) == 3
        assert all(queue[name].exists() for name in queue)
        shown = " ".join(
            f"{s.place} {s!r} {queue_path_for(c.memory)}"
            for s, c in zip(storages, wrapped.values())
        )
        assert token_a not in shown and token_b not in shown

        with pytest.raises(InvalidInputError, match="give each storage its own queue_path"):
            with_fast_memory(
                openai_server.client(), "alice", storage=b, queue_path=queue["a"], **options
            )
    finally:
        for storage in storages:
            storage.close()


# -- a delete by another process between a rewrite's read and its write --------------------------


def _delete_in_another_process(url: str, user_id: str, memory_id: str) -> None:
    """Process A: delete ``memory_id`` of ``user_id`` on the server, and exit."""
    code = f"""
        from conftest import HashEmbedder
        from headroom_memory_integrations import MemoryStore
        MemoryStore({user_id!r}, db_path={url!r}, embedder=HashEmbedder()).delete({memory_id!r})
        """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(Path(__file__).parent),
    )
    assert out.returncode == 0, out.stderr


def _delete_meanwhile(monkeypatch, url: str, user_id: str, memory_id: str, when: str) -> list[str]:
    """Make process A delete the memory once, in this process's next rewrite of it: just after
    the rewrite read it (``"after the read"``), or just before its first write call to Chroma
    (``"before the write"``, after every read the write makes). Returns a list that holds
    ``"deleted"`` once A did."""
    import chromadb.api.models.Collection as chroma_collection

    from headroom_memory_integrations.storage.chroma import ChromaCollection

    fired: list[str] = []

    def delete_once() -> None:
        if not fired:
            _delete_in_another_process(url, user_id, memory_id)
            fired.append("deleted")

    def then_delete(real):
        def call(*args, **kwargs):
            if when == "before the write":
                delete_once()
            result = real(*args, **kwargs)
            if when == "after the read":
                delete_once()
            return result

        return call

    if when == "after the read":
        monkeypatch.setattr(ChromaCollection, "get", then_delete(ChromaCollection.get))
    else:
        for write in ("upsert", "update"):
            real = getattr(chroma_collection.Collection, write)
            monkeypatch.setattr(chroma_collection.Collection, write, then_delete(real))
    return fired


@pytest.mark.parametrize("when", ["after the read", "before the write"])
def test_an_update_loses_to_a_delete_made_meanwhile_by_another_process(
    monkeypatch, chroma_server, when
) -> None:
    """ "Forget my PIN" in one process while another updates it: the delete wins. The update
    raises MemoryNotFoundError and neither text is stored again (Chroma's upsert would have
    created the memory again, current, with the deleted text in its history)."""
    from conftest import HashEmbedder

    from headroom_memory_integrations import MemoryNotFoundError

    user = f"srv-pin-{when.replace(' ', '-')}"
    store = MemoryStore(user, db_path=chroma_server.url, embedder=HashEmbedder())
    secret = store.add("My bank card PIN is 4821")
    fired = _delete_meanwhile(monkeypatch, chroma_server.url, user, secret.id, when)
    with pytest.raises(MemoryNotFoundError):
        store.update(secret.id, "My bank card PIN is 9999")
    assert fired == ["deleted"]
    monkeypatch.undo()
    fresh = MemoryStore(user, db_path=chroma_server.url, embedder=HashEmbedder())
    assert fresh.get_all() == []
    assert fresh.search("What is my bank card PIN?") == []


def test_a_supersede_of_a_memory_deleted_meanwhile_stores_the_new_memory_alone(
    monkeypatch, chroma_server
) -> None:
    """An item that replaces a memory another process deletes meanwhile: the new text is
    stored (it is new information), as a memory of its own; the deleted one is not created
    again, nor its text kept in a history."""
    from conftest import HashEmbedder

    from headroom_memory_integrations import NewMemory

    user = "srv-supersede-deleted"
    store = MemoryStore(user, db_path=chroma_server.url, embedder=HashEmbedder())
    old = store.add("Lives in New York")
    fired = _delete_meanwhile(monkeypatch, chroma_server.url, user, old.id, "before the write")
    [done] = store.remember_many([NewMemory("Lives in Denver", replaces=old.id)])
    assert fired == ["deleted"]
    monkeypatch.undo()
    stored = MemoryStore(user, db_path=chroma_server.url, embedder=HashEmbedder()).get_all()
    assert [(m.text, m.history) for m in stored] == [("Lives in Denver", ())]
    assert stored[0].id != old.id
    assert (done.memory.id, done.outcome.value) == (stored[0].id, "stored")


def test_a_put_over_a_key_deleted_meanwhile_creates_it_without_the_deleted_text(
    monkeypatch, chroma_server
) -> None:
    """put() creates or replaces: over a key another process deletes meanwhile, it creates
    the key afresh, with no history of the deleted value."""
    from conftest import HashEmbedder

    user = "srv-put-deleted"
    store = MemoryStore(user, db_path=chroma_server.url, embedder=HashEmbedder())
    store.put("pin", "My bank card PIN is 4821")
    _delete_meanwhile(monkeypatch, chroma_server.url, user, "pin", "before the write")
    store.put("pin", "My bank card PIN is 9999")
    monkeypatch.undo()
    [memory] = MemoryStore(user, db_path=chroma_server.url, embedder=HashEmbedder()).get_all()
    assert (memory.id, memory.text, memory.history) == ("pin", "My bank card PIN is 9999", ())


@pytest.mark.parametrize("newer_first", [True, False], ids=["newer-first", "older-first"])
def test_a_restore_over_a_memory_deleted_meanwhile_reports_only_the_line_stored(
    monkeypatch, chroma_server, newer_first: bool
) -> None:
    """A restore (``consolidate=False``) of two versions of a memory that another process
    deletes meanwhile: the newer line is stored as it is in the file (the deleted memory's
    text is not kept), and only it is reported stored. The older line, which it outdates, is
    a duplicate of it: nothing of it was stored (it was reported stored too)."""
    import json

    from conftest import HashEmbedder

    user = f"srv-restore-deleted-{newer_first}"
    store = MemoryStore(user, db_path=chroma_server.url, embedder=HashEmbedder())

    def line(text: str, year: int) -> str:
        at = f"{year}-01-01T00:00:00+00:00"
        return json.dumps({"id": "pin", "text": text, "created_at": at, "updated_at": at})

    store.import_([line("My bank card PIN is 1111", 2020)], consolidate=False)
    fired = _delete_meanwhile(monkeypatch, chroma_server.url, user, "pin", "before the write")
    newer, older = line("My bank card PIN is 3333", 2022), line("My bank card PIN is 2222", 2021)
    lines = [newer, older] if newer_first else [older, newer]
    results = store.import_with_outcomes(lines, consolidate=False)
    assert fired == ["deleted"]
    monkeypatch.undo()
    [stored] = MemoryStore(user, db_path=chroma_server.url, embedder=HashEmbedder()).get_all()
    assert (stored.id, stored.text, stored.history) == ("pin", "My bank card PIN is 3333", ())
    outcomes = [(r.outcome.value, r.memory.text) for r in results]
    if not newer_first:
        outcomes.reverse()
    assert outcomes == [
        ("stored", "My bank card PIN is 3333"),
        ("duplicate", "My bank card PIN is 3333"),
    ]


def test_a_failed_rewrite_leaves_a_memory_deleted_meanwhile_deleted(
    monkeypatch, chroma_server
) -> None:
    """Process A deletes a memory while this process updates it, and the update's write then
    fails (the server answers 500): undoing the write puts back the old version of what it
    rewrote with Chroma's update, so the deleted memory stays deleted (an upsert created it
    again, current and searchable, with its old text)."""
    import chromadb.api.models.Collection as chroma_collection
    from chromadb.errors import InternalError
    from conftest import HashEmbedder

    user = "srv-undo-deleted"
    store = MemoryStore(user, db_path=chroma_server.url, embedder=HashEmbedder())
    secret = store.add("My bank card PIN is 4821")
    real_update = chroma_collection.Collection.update
    fired: list[str] = []

    def delete_then_fail_once(collection, *args, **kwargs):
        if fired:
            return real_update(collection, *args, **kwargs)
        _delete_in_another_process(chroma_server.url, user, secret.id)
        fired.append("deleted")
        raise InternalError("Internal server error (the write failed)")

    monkeypatch.setattr(chroma_collection.Collection, "update", delete_then_fail_once)
    with pytest.raises(StorageError, match="the write failed"):
        store.update(secret.id, "My bank card PIN is 9999")
    assert fired == ["deleted"]
    monkeypatch.undo()
    fresh = MemoryStore(user, db_path=chroma_server.url, embedder=HashEmbedder())
    assert fresh.get_all() == []
    assert fresh.search("What is my bank card PIN?") == []


def test_an_update_whose_read_back_fails_is_reported_stored(monkeypatch, tmp_path, caplog) -> None:
    """The server acknowledges an update's write and goes away before the read-back after
    it: the new text is stored, so update() returns it (a write that raises stored nothing)
    and logs one WARNING, without the memory's text."""
    import logging

    import chromadb.api.models.Collection as chroma_collection
    from conftest import ChromaServer, HashEmbedder

    server = ChromaServer(tmp_path / "chroma")
    try:
        store = MemoryStore("srv-read-back", db_path=server.url, embedder=HashEmbedder())
        memory = store.add("Works at Acme")
        real_update = chroma_collection.Collection.update

        def write_then_stop_the_server(collection, *args, **kwargs):
            result = real_update(collection, *args, **kwargs)
            server.stop()  # acknowledged, then the server goes away
            return result

        monkeypatch.setattr(chroma_collection.Collection, "update", write_then_stop_the_server)
        with caplog.at_level(logging.WARNING, logger="headroom_memory_integrations"):
            updated = store.update(memory.id, "Works at Globex")
        monkeypatch.undo()
        assert updated.text == "Works at Globex"
        warned = [r for r in caplog.records if "read back" in r.getMessage()]
        assert len(warned) == 1 and warned[0].levelno == logging.WARNING
        assert not any("Globex" in r.getMessage() or "Acme" in r.getMessage() for r in warned)
    finally:
        server.stop()
    server = ChromaServer(server.path)
    try:
        fresh = MemoryStore("srv-read-back", db_path=server.url, embedder=HashEmbedder())
        [stored] = fresh.get_all()
        assert (stored.text, [h.text for h in stored.history]) == (
            "Works at Globex",
            ["Works at Acme"],
        )
    finally:
        server.stop()


class _PrefixProxy:
    """A reverse proxy that serves a Chroma server under ``/chroma`` only (as a gateway
    does): a request to any other path is answered 404, and each request's path is noted."""

    def __init__(self, target: str) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        target_port = urlsplit(target).port
        self.paths: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                proxy.paths.append(self.path)
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                if not self.path.startswith("/chroma/"):
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", target_port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    upstream.request(
                        self.command, self.path[len("/chroma") :], body=body, headers=headers
                    )
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(name, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def test_a_server_url_with_a_path_is_served_under_that_path(chroma_server) -> None:
    """``from_url("http://host:port/chroma")`` (a server behind a gateway at /chroma) talked
    to ``host:port`` with the path dropped: every request missed the server. The path is
    now kept, for the heartbeat and every request of chromadb's client, and in the storage's
    location and ``db_path`` (which reopen it)."""
    from conftest import HashEmbedder

    proxy = _PrefixProxy(chroma_server.url)
    try:
        for url in (f"{proxy.url}/chroma", f"{proxy.url}/chroma/"):
            storage = ChromaStorage.from_url(url)
            try:
                assert storage.location == storage.db_path == f"{proxy.url}/chroma"
                store = MemoryStore("srv-prefixed", storage=storage, embedder=HashEmbedder())
                store.add("Keeps bees on the roof")
                assert [m.text for m in store.get_all()] == ["Keeps bees on the roof"]
                store.clear()
            finally:
                storage.close()
        assert proxy.paths and all(path.startswith("/chroma/api/v2/") for path in proxy.paths)
        via_db_path = MemoryStore(
            "srv-prefixed", db_path=f"{proxy.url}/chroma", embedder=HashEmbedder()
        )
        assert via_db_path.get_all() == [] and via_db_path.stats()["storage"].endswith("/chroma")
        via_db_path.storage.close()
    finally:
        proxy.close()


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/chroma?tenant=x", "http://127.0.0.1:8000?x=1", "http://h:1/#a"]
)
def test_a_server_url_with_a_query_or_fragment_is_refused(url, tmp_path, monkeypatch) -> None:
    """A query or a fragment was dropped without a word (chromadb's client cannot send
    them): refused, by ``from_url`` and by ``db_path``, naming what is not supported."""
    from headroom_memory_integrations import InvalidInputError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInputError, match=r"has a query \('\?\.\.\.'\) or a fragment"):
        ChromaStorage.from_url(url)
    with pytest.raises(InvalidInputError, match="chromadb's client cannot send"):
        MemoryStore("alice", db_path=url)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("host", ["http://127.0.0.1", "127.0.0.1/chroma", "h?x=1", "u@h"])
def test_connect_refuses_a_url_for_a_host(host) -> None:
    """``connect("http://127.0.0.1", 8000)`` took the URL for an IPv6 host
    (``http://[http://127.0.0.1]:8000``) and never connected."""
    from headroom_memory_integrations import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"use ChromaStorage\.from_url"):
        ChromaStorage.connect(host, 8000)


def test_connect_takes_a_host_name_with_an_s(chroma_server) -> None:
    """The check refusing a URL as a host took ``\\s`` in a raw string for the letter "s":
    ``connect("localhost", port)`` (and any host name holding an "s") was refused."""
    storage = ChromaStorage.connect("localhost", chroma_server.port)
    try:
        assert storage.location == f"http://localhost:{chroma_server.port}"
    finally:
        storage.close()
