"""Per-user state stays bounded: the job queue's writer serves the stores of wrappers without
keeping them alive (a store let go of is collected; its queued writes still land), and
UserStores keeps the most recently used users' stores."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sqlite3
import threading
import time
import weakref
from pathlib import Path

import pytest
from conftest import GatedEmbedder, HashEmbedder

from headroom_memory_integrations import MemoryStore
from headroom_memory_integrations.jobs import Backoff
from headroom_memory_integrations.openai import with_fast_memory, with_memory
from headroom_memory_integrations.testing import Reply
from headroom_memory_integrations.writer import queue_path_for, writer_for

pytestmark = pytest.mark.openai_client

BOB = {"text": "Plays the cello in an orchestra", "category": "fact"}
ALICE = {"text": "Prefers Python for backend work", "category": "preference"}
DOG = {"text": "Has a dog named Rex", "category": "fact"}


def alice_let_go_behind_bob(openai_server, db_path, model_says, bobs, alices):
    """Bob's wrapper (returned) and alice's, each told a memory; bob's embedder holds his write
    at its gate, so alice's waits in the queue behind it; then alice's wrapper is let go of,
    and nothing of the writer's keeps her store alive."""
    bob = with_fast_memory(openai_server.client(), user_id="bob", db_path=db_path, embedder=bobs)
    alice = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=alices
    )
    model_says.memories = [BOB]
    bob.chat.completions.create(model="m", messages=[{"role": "user", "content": "I play cello"}])
    model_says.memories = [ALICE]
    alice.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "I prefer Python for backend work"}]
    )
    held = weakref.ref(alice.memory)
    del alice
    gc.collect()
    assert held() is None
    return bob


def test_a_store_let_go_is_collected_and_its_queued_write_still_lands(
    openai_server, db_path, model, model_says
) -> None:
    gate = threading.Event()
    embedder = GatedEmbedder(model, BOB["text"], gate)
    bob = alice_let_go_behind_bob(openai_server, db_path, model_says, embedder, embedder)

    gate.set()
    assert writer_for(queue_path_for(bob.memory)).flush(30)  # every user's jobs
    stored = MemoryStore("alice", storage=bob.memory.storage, embedder=model).get_all()
    assert [m.text for m in stored] == [ALICE["text"]]  # written on a store built for the job
    bob.memory.close()


def test_the_stores_of_many_users_are_bounded(db_path, model) -> None:
    """A LangGraph store or memory tools serving many users keep the most recent ones' stores;
    a user let go of comes back with their memories."""
    from headroom_memory_integrations.wiring import OPEN_USERS, UserStores

    stores = UserStores(db_path, embedder=model)
    stores("user-0").add("Plays the cello in an orchestra")
    first = weakref.ref(stores("user-0"))
    for n in range(1, OPEN_USERS + 50):
        stores(f"user-{n}")  # built, not read: no collection is created for them
    assert len(stores._stores) == OPEN_USERS
    gc.collect()
    assert first() is None
    assert [m.text for m in stores("user-0").get_all()] == ["Plays the cello in an orchestra"]
    assert stores.users() == ["user-0"]


def extracting_wrappers(openai_server, db_path, model, *names: tuple[str, str]):
    """with_memory wrappers on one folder, one per (user, name): each extracts with a model
    named "<user>-<name>"."""
    return [
        with_memory(
            openai_server.client(),
            user_id=user,
            db_path=db_path,
            embedder=model,
            extraction_model=f"{user}-{name}",
        )
        for user, name in names
    ]


def alice_and_bob(openai_server, db_path, model):
    """Two with_memory wrappers on one folder, each extracting with a model named after its
    user ("alice-extractor", "bob-extractor")."""
    names = ("alice", "extractor"), ("bob", "extractor")
    return extracting_wrappers(openai_server, db_path, model, *names)


def test_a_wrapper_let_go_of_leaves_no_extractor_and_its_queued_extraction_still_runs(
    openai_server, db_path, model
) -> None:
    """The writer held every with_memory user's extractor (and its model client) for good.
    Now it holds it as long as the user's store, and a job queued before the store was let
    go of keeps it until done: it runs with its own extractor, not another user's."""
    gate = threading.Event()
    extractions: list[str] = []  # the extraction model each call named

    def respond(body: dict) -> Reply:
        if "You maintain long-term memory" not in body["messages"][0]["content"]:
            return Reply.text("Noted.")
        extractions.append(body["model"])
        if body["model"] == "alice-extractor":
            gate.wait(60)  # holds the worker: bob's job waits in the queue meanwhile
        said = BOB if body["model"] == "bob-extractor" else ALICE
        return Reply.text(json.dumps({"memories": [said]}))

    openai_server.responder = respond
    alice, bob = alice_and_bob(openai_server, db_path, model)
    writer = writer_for(queue_path_for(alice.memory))
    alice.chat.completions.create(model="m", messages=[{"role": "user", "content": "I use Python"}])
    deadline = time.monotonic() + 30
    while not extractions:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    bob.chat.completions.create(model="m", messages=[{"role": "user", "content": "I play cello"}])
    [bobs] = [e for es in writer._extractors.values() for e in es if e.model == "bob-extractor"]
    extractor = weakref.ref(bobs)
    del bobs
    store = weakref.ref(bob.memory)
    del bob
    gc.collect()
    assert store() is None and extractor() is not None  # kept for the job still queued

    gate.set()
    assert writer.flush(30)  # every user's jobs
    assert extractions == ["alice-extractor", "bob-extractor"]  # each with its own
    gc.collect()
    assert extractor() is None and not writer._queued_with  # nothing of bob's is held
    stored = MemoryStore("bob", storage=alice.memory.storage, embedder=model).get_all()
    assert [m.text for m in stored] == [BOB["text"]]
    alice.close()


def test_a_dead_lettered_extraction_retried_after_its_wrapper_went_keeps_its_own_extractor(
    openai_server, db_path, model
) -> None:
    """An extraction dead-lettered (a bad request) and queued again with retry_failed() after
    its wrapper was let go of runs with the extractor it was queued with, never with that of
    another user's wrapper (its model client, its extraction model)."""
    extractions: list[str] = []  # the extraction model each call named

    def respond(body: dict) -> Reply:
        if "You maintain long-term memory" not in body["messages"][0]["content"]:
            return Reply.text("Noted.")
        extractions.append(body["model"])
        if len(extractions) == 1:
            return Reply.error(400, "bad request")  # dead-lettered at once
        return Reply.text(json.dumps({"memories": [ALICE]}))

    openai_server.responder = respond
    alice, bob = alice_and_bob(openai_server, db_path, model)
    alice.chat.completions.create(model="m", messages=[{"role": "user", "content": "I use Python"}])
    writer = writer_for(queue_path_for(bob.memory))
    assert writer.flush(30) and extractions == ["alice-extractor"]
    store = weakref.ref(alice.memory)
    del alice
    gc.collect()
    assert store() is None

    assert bob.memory.retry_failed() == 1
    assert writer.flush(30)
    assert extractions == ["alice-extractor", "alice-extractor"]  # not bob's
    stored = MemoryStore("alice", storage=bob.memory.storage, embedder=model).get_all()
    assert [m.text for m in stored] == [ALICE["text"]]
    bob.close()


def test_a_turn_left_by_an_earlier_process_is_never_extracted_through_another_tenants_client(
    openai_server, db_path, model
) -> None:
    """A process that died left alice's turn in the queue, queued through tenant A's client.
    The next process's first wrapper was bob's, on tenant B's endpoint and key: bob's
    extractor ran it, sending alice's conversation to B. Now a left job runs only with an
    extractor of its user, or of another user whose calls go where its own did (the same
    endpoint, key and model: one client for all users, the usual case)."""
    from headroom_memory_integrations.jobs import Backoff, JobQueue
    from headroom_memory_integrations.openai import client_destination
    from headroom_memory_integrations.testing import ScriptedOpenAIServer

    extracted: dict[str, list[str]] = {"A": [], "B": []}

    def tenant(name: str):
        def respond(body: dict) -> Reply:
            if "You maintain long-term memory" not in body["messages"][0]["content"]:
                return Reply.text("Noted.")
            extracted[name].append(json.dumps(body["messages"]))
            said = ALICE if "I prefer Python" in json.dumps(body["messages"]) else BOB
            return Reply.text(json.dumps({"memories": [said]}))

        return respond

    openai_server.responder = tenant("A")
    keyed = [client_destination(openai_server.client(api_key=k), None) for k in "xxy"]
    assert keyed[0] == keyed[1] != keyed[2]  # one endpoint, another key: another destination
    with ScriptedOpenAIServer(responder=tenant("B")) as other:
        tenant_a = openai_server.client(api_key="tenant-A-key")
        turn = {
            "exchange": [{"role": "user", "content": "I prefer Python for backend work"}],
            "injected": {},
            "model": "m",
            "untrusted": False,
            "destination": client_destination(tenant_a, None),
        }
        db_path.mkdir(parents=True)
        queue = JobQueue(db_path / "jobs.sqlite3")  # as the earlier process left it
        queue.put("extract", "alice", turn)
        queue.put("extract", "dave", {**turn, "exchange": [{"role": "user", "content": "Hi"}]})
        queue.close()

        bob = with_memory(
            other.client(api_key="tenant-B-key"),
            user_id="bob",
            db_path=db_path,
            embedder=model,
            retry_backoff=Backoff(initial=0.05, maximum=0.2),  # the waiting jobs, tried again
        )
        bob.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "I play cello"}]
        )
        assert bob.memory.flush(30)  # bob's own turn, through B
        writer = writer_for(queue_path_for(bob.memory))
        assert not writer.flush(1.5)  # alice's and dave's wait: no extractor of theirs here
        assert len(extracted["B"]) == 1 and "I prefer Python" not in extracted["B"][0]

        carol = with_memory(
            openai_server.client(api_key="tenant-A-key"),
            user_id="carol",
            db_path=db_path,
            embedder=model,
        )  # tenant A's client: the turns left through it may go there again
        assert writer.flush(30)
        assert len(extracted["A"]) == 2 and len(extracted["B"]) == 1
        stored = MemoryStore("alice", storage=bob.memory.storage, embedder=model).get_all()
        assert [m.text for m in stored] == [ALICE["text"]]
        carol.close()
        bob.close()


class TenantEmbedder(HashEmbedder):
    """A tenant's own embedder (its API key, its endpoint): records every text sent to it;
    embedding ``hold`` waits for ``gate``."""

    def __init__(self, name: str, hold: str = "", gate: threading.Event | None = None) -> None:
        super().__init__(name=name)
        self.hold, self.gate, self.seen = hold, gate, []

    def embed(self, texts):
        self.seen += list(texts)
        if self.gate is not None and self.hold in texts:
            assert self.gate.wait(60)
        return super().embed(texts)


def test_a_job_of_a_wrapper_let_go_of_is_never_embedded_by_another_tenants_embedder(
    openai_server, db_path, model_says
) -> None:
    """Two tenants with embedders of their own on one folder. Alice's wrapper, built for a
    request and let go of, left her memory queued: it ran on a store built with the first
    registered store's embedder (bob's), which got her text, then her collection was marked
    with his embedder and her own store refused. Now it runs with the embedder of the store
    that queued it."""
    gate = threading.Event()
    bobs = TenantEmbedder("tenant-b", hold=BOB["text"], gate=gate)
    alices = TenantEmbedder("tenant-a")
    bob = alice_let_go_behind_bob(openai_server, db_path, model_says, bobs, alices)

    gate.set()
    writer = writer_for(queue_path_for(bob.memory))
    assert writer.flush(30)
    assert ALICE["text"] not in bobs.seen and ALICE["text"] in alices.seen
    assert not writer._embedded_with  # nothing of alice's is held once her job is done
    stored = MemoryStore(
        "alice", storage=bob.memory.storage, embedder=TenantEmbedder("tenant-a")
    ).get_all()
    assert [m.text for m in stored] == [ALICE["text"]]
    bob.memory.close()


def test_the_embedder_kept_for_a_job_another_process_ran_is_let_go_of(
    openai_server, db_path, model_says, monkeypatch
) -> None:
    """An application makes an embedder per request: alice's wrapper, let go of, left her
    memory queued, and the writer keeps her embedder for the job (it runs with it). Another
    process on the folder runs the job: this one is never told, and kept the embedder (and
    its client's connections) until 10,000 later jobs. Now it is let go of once the file no
    longer holds the job."""
    from headroom_memory_integrations import writer

    monkeypatch.setattr(writer, "KEPT_FOR_JOBS_CHECKED_EVERY", 0.0)
    gate = threading.Event()
    bobs = TenantEmbedder("tenant-b", hold=BOB["text"], gate=gate)
    alices = TenantEmbedder("tenant-a")
    kept = weakref.ref(alices)
    bob = alice_let_go_behind_bob(openai_server, db_path, model_says, bobs, alices)
    del alices
    queue = queue_path_for(bob.memory)

    def alices_jobs() -> int:
        with contextlib.closing(sqlite3.connect(queue)) as conn:
            return conn.execute("SELECT COUNT(*) FROM jobs WHERE user_id = 'alice'").fetchone()[0]

    # queued behind bob's, held at his embedder's gate
    wait_for(lambda: alices_jobs() == 1, "alice's job queued")
    with contextlib.closing(sqlite3.connect(queue)) as conn, conn:  # another process ran it
        conn.execute("DELETE FROM jobs WHERE user_id = 'alice'")
    gc.collect()
    assert kept() is not None  # kept for the job while it may run here
    gate.set()
    assert writer_for(queue).flush(30)
    gc.collect()
    assert kept() is None
    assert ALICE["text"] not in bobs.seen
    bob.memory.close()


class FailsOnceEmbedder(TenantEmbedder):
    """A tenant's embedder whose first embedding of ``ALICE["text"]`` raises TypeError (its
    job is dead-lettered)."""

    def embed(self, texts):
        if ALICE["text"] in texts and ALICE["text"] not in self.seen:
            self.seen += list(texts)
            raise TypeError("a broken first call")
        return super().embed(texts)


def test_the_embedder_kept_for_a_dead_lettered_job_outlasts_the_check_of_jobs_run_elsewhere(
    openai_server, db_path, model_says, monkeypatch
) -> None:
    """The check that lets go of what was kept for jobs another process ran keeps what a job
    still in the file needs: alice's dead-lettered job, run again by ``retry_failed()`` after
    a check, runs with her own embedder (let go of, no store of hers is registered here, so
    it would wait for ever)."""
    from headroom_memory_integrations import writer

    monkeypatch.setattr(writer, "KEPT_FOR_JOBS_CHECKED_EVERY", 0.0)
    gate = threading.Event()
    bobs = TenantEmbedder("tenant-b", hold=BOB["text"], gate=gate)
    alices = FailsOnceEmbedder("tenant-a")
    bob = alice_let_go_behind_bob(openai_server, db_path, model_says, bobs, alices)
    queue = writer_for(queue_path_for(bob.memory))
    gate.set()
    wait_for(lambda: queue.stats()["failed"] >= 1, "alice's job dead-lettered")
    model_says.memories = [DOG]  # bob's next job is handled here: a check runs after it
    bob.chat.completions.create(model="m", messages=[{"role": "user", "content": "I have a dog"}])
    assert queue.flush(60)
    assert queue.retry_failed() == 1
    assert queue.flush(60)  # (without her embedder her job would wait)
    stored = MemoryStore("alice", storage=bob.memory.storage, embedder=alices).get_all()
    assert [m.text for m in stored] == [ALICE["text"]]
    assert ALICE["text"] not in bobs.seen
    bob.memory.close()


def test_a_job_left_by_an_earlier_process_waits_for_a_store_with_its_embedder(
    openai_server, db_path
) -> None:
    """A job left in the queue (by a process that died) names its store's embedder; it runs
    only with an embedder of that name, never with another tenant's (here the first store
    registered, bob's, on tenant B's key); it waits meanwhile."""
    from headroom_memory_integrations.jobs import JobQueue

    db_path.mkdir(parents=True)
    queue = JobQueue(db_path / "jobs.sqlite3")  # as the earlier process left it
    queue.put("store", "alice", {"memories": [ALICE], "embedder": "tenant-a"})
    queue.close()

    bobs = TenantEmbedder("tenant-b")
    bob = with_memory(
        openai_server.client(),
        user_id="bob",
        db_path=db_path,
        embedder=bobs,
        retry_backoff=Backoff(initial=0.05, maximum=0.2),  # the waiting job, tried again
    )
    writer = writer_for(queue_path_for(bob.memory))
    assert not writer.flush(1.5)  # alice's job waits: no store with her embedder here
    assert ALICE["text"] not in bobs.seen

    carols = TenantEmbedder("tenant-a")  # tenant A's embedder, for another of its users
    carol = with_memory(openai_server.client(), user_id="carol", db_path=db_path, embedder=carols)
    assert writer.flush(30)
    assert ALICE["text"] not in bobs.seen and ALICE["text"] in carols.seen
    stored = MemoryStore(
        "alice", storage=bob.memory.storage, embedder=TenantEmbedder("tenant-a")
    ).get_all()
    assert [m.text for m in stored] == [ALICE["text"]]
    carol.close()
    bob.close()


def test_openai_embedders_on_other_keys_are_other_embedders(openai_server) -> None:
    """Tenants often use the same OpenAI model, each with its own key: their embedders share a
    name, not an identity (which holds no secret)."""
    from headroom_memory_integrations.embeddings import OpenAIEmbedder
    from headroom_memory_integrations.writer import embedder_identity

    keys = ["sk-tenant-a-secret", "sk-tenant-a-secret", "sk-tenant-b-secret"]
    found = [embedder_identity(OpenAIEmbedder(openai_server.client(api_key=k))) for k in keys]
    assert found[0] == found[1] != found[2]
    assert all(f.startswith("openai/text-embedding-3-small") for f in found)
    assert not any("secret" in f for f in found)


def left_by_an_earlier_process(db_path, user_id: str, memory: dict, embedder) -> None:
    """Put a store job in the queue file of ``db_path`` as a process that died left it."""
    from headroom_memory_integrations.jobs import JobQueue
    from headroom_memory_integrations.writer import embedder_identity

    queue = JobQueue(db_path / "jobs.sqlite3")
    queue.put("store", user_id, {"memories": [memory], "embedder": embedder_identity(embedder)})
    queue.close()


def test_a_job_waits_while_several_tenants_embedders_of_its_name_are_here(
    openai_server, db_path
) -> None:
    """Tenants' custom embedders of one model ("voyage-3"), each on its own key, share a name
    and have no ``destination``: their identities are equal. A job of alice's left by an
    earlier process ran with the first registered store's embedder, bob's (tenant B): her text
    went to his key. With several embedders of the job's identity here, the job now waits for
    her own store."""
    db_path.mkdir(parents=True)
    bobs, carols = TenantEmbedder("voyage-3"), TenantEmbedder("voyage-3")  # tenants B and A
    wrappers = [
        with_memory(
            openai_server.client(),
            user_id=user,
            db_path=db_path,
            embedder=embedder,
            retry_backoff=Backoff(initial=0.05, maximum=0.2),  # the waiting job, tried again
        )
        for user, embedder in (("bob", bobs), ("carol", carols))
    ]
    writer = writer_for(queue_path_for(wrappers[0].memory))
    left_by_an_earlier_process(db_path, "alice", ALICE, TenantEmbedder("voyage-3"))
    writer.worker.notify("alice")
    assert not writer.flush(1.5)  # which of the two is hers cannot be told: it waits
    assert ALICE["text"] not in bobs.seen + carols.seen

    alices = TenantEmbedder("voyage-3")
    alice = with_memory(openai_server.client(), user_id="alice", db_path=db_path, embedder=alices)
    assert writer.flush(30)
    assert ALICE["text"] in alices.seen and ALICE["text"] not in bobs.seen + carols.seen
    assert [m.text for m in alice.memory.get_all()] == [ALICE["text"]]
    for wrapper in (alice, *wrappers):
        wrapper.close()


def test_a_job_waits_while_openai_embedders_on_several_key_providers_are_here(
    openai_server, db_path
) -> None:
    """OpenAIEmbedders on one endpoint whose clients differ only by a key provider (a
    callable api_key): the identity hashed only a key given as a string, so they were one
    identity with a hash, and alice's job left by an earlier process was embedded with bob's
    key. Such an identity is now the model's name alone, and the job waits while several are
    here."""
    from headroom_memory_integrations.embeddings import OpenAIEmbedder

    db_path.mkdir(parents=True)

    def embedder(key: str) -> OpenAIEmbedder:
        return OpenAIEmbedder(
            openai_server.client(api_key=lambda: key, max_retries=0)  # type: ignore[arg-type]
        )

    wrappers = [
        with_memory(
            openai_server.client(),
            user_id=user,
            db_path=db_path,
            embedder=embedder(key),
            retry_backoff=Backoff(initial=0.05, maximum=0.2),
        )
        for user, key in (("bob", "sk-tenant-b"), ("carol", "sk-tenant-a"))
    ]
    writer = writer_for(queue_path_for(wrappers[0].memory))
    left_by_an_earlier_process(db_path, "alice", ALICE, embedder("sk-tenant-a"))
    writer.worker.notify("alice")
    assert not writer.flush(1.5)

    def embedded_alices_text_with() -> list[str]:
        return [
            request.headers.get("authorization", "")
            for request in openai_server.requests
            if request.path.endswith("/embeddings") and ALICE["text"] in json.dumps(request.body)
        ]

    assert embedded_alices_text_with() == []
    alice = with_memory(
        openai_server.client(),
        user_id="alice",
        db_path=db_path,
        embedder=embedder("sk-tenant-a"),
    )
    assert writer.flush(30)
    assert embedded_alices_text_with() and all(
        "sk-tenant-a" in found for found in embedded_alices_text_with()
    )
    for wrapper in (alice, *wrappers):
        wrapper.close()


def test_a_job_left_by_an_earlier_process_runs_at_once_with_the_one_custom_embedder(
    openai_server, db_path
) -> None:
    """One application, one custom embedder object shared by all its users: a job of a user
    not here runs at once with it (the waiting is for several embedders of one identity)."""
    db_path.mkdir(parents=True)
    shared = TenantEmbedder("voyage-3")
    wrappers = [
        with_memory(openai_server.client(), user_id=user, db_path=db_path, embedder=shared)
        for user in ("bob", "carol")
    ]
    writer = writer_for(queue_path_for(wrappers[0].memory))
    left_by_an_earlier_process(db_path, "alice", ALICE, shared)
    writer.worker.notify("alice")
    assert writer.flush(30)
    stored = MemoryStore(
        "alice", storage=wrappers[0].memory.storage, embedder=TenantEmbedder("voyage-3")
    ).get_all()
    assert [m.text for m in stored] == [ALICE["text"]]
    for wrapper in wrappers:
        wrapper.close()


def test_openai_clients_with_key_providers_or_azure_ad_have_no_destination() -> None:
    """A hash of such a client cannot tell two tenants apart: no destination (the extractor's
    turns then wait for their user's own; an embedder is known by its name alone)."""
    from openai import AzureOpenAI, OpenAI

    from headroom_memory_integrations.openai import client_destination

    azure = {"azure_endpoint": "https://x.openai.azure.com", "api_version": "2024-02-01"}
    unknown = [
        OpenAI(api_key=lambda: "sk-a", base_url="http://127.0.0.1:9/v1"),
        AzureOpenAI(azure_ad_token_provider=lambda: "token-a", **azure),
        AzureOpenAI(azure_ad_token="token-a", **azure),
    ]
    assert [client_destination(client, "m") for client in unknown] == [None, None, None]
    keyed = [
        client_destination(OpenAI(api_key=key, base_url="http://127.0.0.1:9/v1"), "m")
        for key in ("sk-a", "sk-a", "sk-b")
    ]
    assert keyed[0] == keyed[1] != keyed[2] and all(isinstance(k, str) for k in keyed)
    assert isinstance(client_destination(AzureOpenAI(api_key="k", **azure), "m"), str)


def recording_extractions(openai_server, memory: dict, gate: threading.Event | None = None):
    """The scripted model answers chat calls "Noted." and extraction calls ``memory`` (after
    ``gate``, if given); returns the list of the extraction model each extraction call named."""
    extractions: list[str] = []

    def respond(body: dict) -> Reply:
        if "You maintain long-term memory" not in body["messages"][0]["content"]:
            return Reply.text("Noted.")
        extractions.append(body["model"])
        if gate is not None:
            assert gate.wait(60)
        return Reply.text(json.dumps({"memories": [memory]}))

    openai_server.responder = respond
    return extractions


def wait_for(condition, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.parametrize("closing", ["older", "newer"])
def test_closing_one_of_a_users_two_stores_keeps_the_other_served(
    openai_server, db_path, model, model_says, closing
) -> None:
    """The writer took the close of either of alice's two stores (a wrapper and a LangChain
    model, a wrapper per request) for the close of the last store on the queue (it judged
    from the newest store of each user) and stopped the workers while the other was in use:
    its memories went to the file for the next process, its next call did not find them, and
    its flush() failed on the closed queue. Now the workers stop once no store is left open,
    whichever user's."""
    from headroom_memory_integrations.prompts import CONTEXT_OPEN

    older, newer = (
        with_fast_memory(openai_server.client(), user_id="alice", db_path=db_path, embedder=model)
        for _ in range(2)
    )
    writer = writer_for(queue_path_for(older.memory))
    closed, in_use = (older, newer) if closing == "older" else (newer, older)
    assert closed.memory.close(5)
    assert not writer.worker.closed  # alice's other store is in use

    model_says.memories = [DOG]
    in_use.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "My dog is called Rex"}]
    )
    # stored through the workers the close left running (a closed queue fails the flush); a
    # loaded machine can take longer than the next call's read-your-writes wait to store it
    assert in_use.memory.flush(60)
    model_says.memories = []
    in_use.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is my dog's name?"}]
    )
    system = openai_server.requests[-1].body["messages"][0]["content"]
    assert DOG["text"] in system.partition(CONTEXT_OPEN)[2]  # stored here, read next call
    assert in_use.memory.flush(5)
    assert not in_use.memory.stats()["events"].get("flush_failures")

    assert in_use.memory.close(5)
    assert writer.worker.closed and writer.extractions.closed  # the last store on the queue
    older.close()
    newer.close()


@pytest.mark.parametrize("newest", ["closed", "let go of"])
def test_a_users_jobs_run_with_their_other_store_once_their_newest_is_gone(
    openai_server, db_path, model, newest
) -> None:
    """Alice has two with_memory wrappers (each extracting with its own model), bob one. Once
    alice's newest store was closed or let go of, the writer forgot her older one: a turn of
    hers that an earlier process left queued (no extractor of its own) waited for ever, with
    none of hers in this process. Now it runs with the extractor of her store still open."""
    from headroom_memory_integrations.jobs import JobQueue

    extractions = recording_extractions(openai_server, ALICE)
    older, newer, bob = extracting_wrappers(
        openai_server, db_path, model, ("alice", "older"), ("alice", "newer"), ("bob", "x")
    )
    writer = writer_for(queue_path_for(older.memory))
    if newest == "closed":
        assert newer.memory.close(5)
    else:
        gone = weakref.ref(newer.memory)
        del newer
        gc.collect()
        assert gone() is None

    queue = JobQueue(writer.worker.queue.path)  # as an earlier process left it
    turn = [{"role": "user", "content": "I prefer Python for backend work"}]
    queue.put("extract", "alice", {"exchange": turn, "injected": {}, "model": None})
    queue.close()
    writer.extractions.notify("alice")
    assert writer.flush(30)
    assert extractions == ["alice-older"]
    assert [m.text for m in older.memory.get_all()] == [ALICE["text"]]
    older.close()
    bob.close()


def test_a_short_close_of_the_last_store_does_not_cut_short_a_longer_close_of_another(
    openai_server, db_path, model
) -> None:
    """Alice's store a closes with a long timeout while her turns are still extracted (one
    under way, the next queued behind it); her store b closes meanwhile with a short one, and
    is the last store on the queue. b stopped the workers after its own short wait, and a's
    close, still waiting, failed on the closed queue (a flush failure, her second turn left
    in the file). The last close now waits as long as the longest of the closes under way."""
    gate = threading.Event()
    extractions = recording_extractions(openai_server, ALICE, gate)
    a, b = extracting_wrappers(openai_server, db_path, model, ("alice", "a"), ("alice", "b"))
    writer = writer_for(queue_path_for(a.memory))
    for said in ("I use Python", "I like it for backend work"):
        a.chat.completions.create(model="m", messages=[{"role": "user", "content": said}])
    wait_for(lambda: extractions, "the first extraction call")
    closed: dict[str, bool] = {}
    closer = threading.Thread(target=lambda: closed.update(a=a.memory.close(300)))
    closer.start()
    wait_for(lambda: writer._closing, "a's close")
    b_closed = threading.Thread(target=lambda: closed.update(b=b.memory.close(0.3)))
    b_closed.start()
    b_closed.join(2)  # well past its own 0.3 s (a stalled machine can only make it pass)
    assert b_closed.is_alive() and not writer.extractions.closed  # waits for a's close
    gate.set()
    closer.join(300)
    b_closed.join(300)
    assert closed["a"]
    assert not a.memory.stats()["events"].get("flush_failures")
    assert extractions == ["alice-a", "alice-a"]  # both turns, before the workers stopped
    assert [m.text for m in a.memory.get_all()] == [ALICE["text"]]
    assert writer.worker.closed and writer.extractions.closed


def test_a_store_registered_while_the_last_one_closes_is_served(
    openai_server, db_path, model
) -> None:
    """Bob's wrapper was built while alice's store, the last on the queue, was closing (its
    turn still extracted): it got the writer whose workers her close then stopped, so bob's
    memories went to the file for the next process and his flush() failed. The close now
    stops the workers only if no store was registered while it drained."""
    gate = threading.Event()
    extractions = recording_extractions(openai_server, ALICE, gate)
    [alice] = extracting_wrappers(openai_server, db_path, model, ("alice", "x"))
    writer = writer_for(queue_path_for(alice.memory))
    alice.chat.completions.create(model="m", messages=[{"role": "user", "content": "I use Python"}])
    wait_for(lambda: extractions, "alice's extraction call")
    closer = threading.Thread(target=lambda: alice.memory.close(300))
    closer.start()
    wait_for(lambda: writer._closing, "alice's close")
    [bob] = extracting_wrappers(openai_server, db_path, model, ("bob", "x"))
    gate.set()
    closer.join(300)

    bob.chat.completions.create(model="m", messages=[{"role": "user", "content": "I cook"}])
    assert bob.memory.flush(30)
    assert extractions == ["alice-x", "bob-x"]
    assert [m.text for m in bob.memory.get_all()] == [ALICE["text"]]
    bob.close()


def test_a_store_registered_with_a_writer_stopped_meanwhile_gets_a_new_one(
    openai_server, db_path, model
) -> None:
    """A wrapper is built in two steps: the file's writer is looked up, then the store is
    registered with it. The last store closing in between stopped the workers, and the new
    store was registered with the stopped writer: nothing in this process ran its jobs. Now
    it is served by a new writer of the file."""
    alice = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=model
    )
    found = writer_for(queue_path_for(alice.memory))
    assert alice.memory.close(5) and found.worker.closed

    bob = MemoryStore("bob", storage=alice.memory.storage, embedder=model)
    serving = found.register(bob)
    assert serving is writer_for(queue_path_for(bob)) and not serving.worker.closed
    serving.store(bob, [BOB])  # as bob's wrapper's call does
    assert bob.flush(30)
    assert [m.text for m in bob.get_all()] == [BOB["text"]]
    bob.close()


def files_held_in(folder) -> list[str]:
    """The files under ``folder`` this process has open (empty where /proc is missing)."""
    fds = Path("/proc/self/fd")
    held = []
    for fd in fds.iterdir() if fds.is_dir() else ():
        with contextlib.suppress(OSError):  # (closed meanwhile)
            held.append(os.readlink(fd))
    return [p for p in held if p.startswith(str(folder))]


def test_stores_never_closed_do_not_keep_the_queue_file_open_once_the_storage_is_closed(
    openai_server, db_path, model, model_says
) -> None:
    """A notebook's first client, kept by the kernel's output history (Out[]), is never
    closed. Its store counts as open, and kept the workers and the queue file open after the
    folder's storage was closed (ChromaStorage.at(path).close(), as docs/reliability.md tells
    a process that cycles through folders): a kernel running notebooks again and again leaked
    files. Closing the storage now stops the workers of its stores' queue and closes the
    file; what is left in it stays there for the next process."""
    from headroom_memory_integrations import ChromaStorage

    kept, bob = (
        with_fast_memory(openai_server.client(), user_id=user, db_path=db_path, embedder=model)
        for user in ("alice", "bob")
    )
    model_says.memories = [BOB]
    bob.chat.completions.create(model="m", messages=[{"role": "user", "content": "I play cello"}])
    assert bob.memory.flush(30)
    writer = writer_for(queue_path_for(bob.memory))
    assert not writer.worker.closed

    ChromaStorage.at(db_path).close()
    assert writer.worker.closed and writer.extractions.closed
    if Path("/proc/self/fd").is_dir():
        wait_for(lambda: not files_held_in(db_path), "the folder's files closed")
    shutil.rmtree(db_path)
    assert not db_path.exists()
    kept.close()
    bob.close()


@pytest.mark.parametrize("store", ["closed", "never closed"])
def test_closing_a_folders_storage_lets_go_of_its_writer_and_storage(
    openai_server, db_path, model, model_says, store
) -> None:
    """The process kept each queue file's stopped writer, and with it the storage it served
    (closed) and the first store's embedder, until a store was opened on that file again: a
    process that cycles through folders, closing each one's storage as docs/reliability.md
    tells it, kept them all. Once its workers stop, the process lets go of the writer."""
    from headroom_memory_integrations import ChromaStorage

    client = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=model
    )
    model_says.memories = [ALICE]
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Python"}])
    assert client.memory.flush(30)
    storage = weakref.ref(client.memory.storage)
    writer = weakref.ref(writer_for(queue_path_for(client.memory)))
    if store == "closed":
        client.close()
    ChromaStorage.at(db_path).close()
    del client

    def let_go() -> bool:
        gc.collect()
        return writer() is None and storage() is None

    # (once the storage's own threads have ended: its background reads, a moment)
    wait_for(let_go, "the process still holds the writer or the storage")


def test_a_job_renumbered_when_its_queue_file_was_replaced_runs_with_its_own_embedder(
    openai_server, db_path, model_says, monkeypatch
) -> None:
    """Alice's job waits behind bob's; her wrapper is let go of, so only the writer keeps her
    embedder (under her job's id). The queue file is deleted and a file made by an older
    version put at its path, whose job has her job's id: the queue moves her job there
    under a new id. It still runs with her embedder (the writer follows the new id; before,
    it looked for her embedder under the new id, found none and waited for ever), and the
    check of jobs run elsewhere does not let go of it."""
    from headroom_memory_integrations import writer
    from headroom_memory_integrations.jobs import JobQueue

    monkeypatch.setattr(writer, "KEPT_FOR_JOBS_CHECKED_EVERY", 0.0)
    gate = threading.Event()
    bobs = TenantEmbedder("tenant-b", hold=BOB["text"], gate=gate)
    alices = TenantEmbedder("tenant-a")
    bob = alice_let_go_behind_bob(openai_server, db_path, model_says, bobs, alices)
    queue = os.fspath(queue_path_for(bob.memory))

    def alices_ids() -> list[int]:
        with contextlib.closing(sqlite3.connect(queue)) as conn:
            return [r[0] for r in conn.execute("SELECT id FROM jobs WHERE user_id = 'alice'")]

    wait_for(lambda: len(alices_ids()) == 1, "alice's job queued")
    [alices_id] = alices_ids()
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(queue + suffix)
    older = JobQueue(queue)  # another process's file, numbered as an older version did
    theirs = older.put("later", "carol", {"n": 1})
    with contextlib.closing(sqlite3.connect(queue)) as conn, conn:
        conn.execute("UPDATE jobs SET id = ? WHERE id = ?", (alices_id, theirs))
    older.close()
    writer_for(queue).worker.queue.counts()  # the writer's queue moves the jobs now
    moved = [i for i in alices_ids() if i != alices_id]
    assert len(moved) == 1  # her job, under a new id
    with contextlib.closing(sqlite3.connect(queue)) as conn, conn:  # the other process ran its
        conn.execute("DELETE FROM jobs WHERE id = ?", (alices_id,))
    gate.set()
    assert writer_for(queue).flush(60)
    with writer_for(queue)._settled:  # her reads wait for nothing more (not the old id)
        assert not writer_for(queue)._unsettled_of("alice")
    assert ALICE["text"] in alices.seen and ALICE["text"] not in bobs.seen
    stored = MemoryStore("alice", storage=bob.memory.storage, embedder=alices).get_all()
    assert [m.text for m in stored] == [ALICE["text"]]
    bob.memory.close()
