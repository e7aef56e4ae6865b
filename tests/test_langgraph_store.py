"""HeadroomStore: LangGraph's BaseStore over the memory engine, with real Chroma, the real model,
real LangGraph graphs and a real ChatOpenAI over HTTP to the scripted server."""

from __future__ import annotations

import asyncio
import io
import json
from typing import TypedDict

import pytest
from _langgraph_support import chat_model, request_text, run_async, run_python, tool_messages
from langchain.agents import create_agent
from langchain.tools import ToolRuntime
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.store.base import BaseStore, ListNamespacesOp, MatchCondition, PutOp, SearchOp

from headroom_memory_integrations import InvalidInputError, MemoryStore
from headroom_memory_integrations.langchain import HeadroomStore, namespace_user
from headroom_memory_integrations.langchain.store import SEPARATOR, InvalidNamespaceError
from headroom_memory_integrations.openai import with_fast_memory
from headroom_memory_integrations.testing import Reply

PYTHON = {"text": "Prefers Python for backend work", "category": "preference"}
PEANUTS = {"text": "Is allergic to peanuts", "category": "fact"}
MARATHON = {"text": "Is training for the Berlin marathon", "category": "context"}


@pytest.fixture
def store(db_path, model) -> HeadroomStore:
    return HeadroomStore(db_path=db_path, embedder=model)


# -- CRUD with caller keys ----------------------------------------------------------------------


def test_put_then_get_returns_the_value_put(store) -> None:
    value = {
        "text": "  Prefers tea over coffee\n",
        "category": "Preference",
        "score": 4.5,
        "tags": ["drinks", "morning"],
        "nested": {"since": 2019, "ok": True, "none": None},
        "unicode": "thé vert 🍵",
    }
    assert store.get(("alice",), "drinks") is None
    store.put(("alice",), "drinks", value)
    item = store.get(("alice",), "drinks")
    assert item is not None
    assert (item.namespace, item.key, item.value) == (("alice",), "drinks", value)
    assert item.created_at == item.updated_at and item.created_at.tzinfo is not None
    # the memory behind it: the text field, stripped, with the value's category
    memory = store.memory(("alice",)).get("drinks")
    assert (memory.text, memory.category.value) == ("Prefers tea over coffee", "preference")


def test_put_replaces_in_place_and_delete_removes(store) -> None:
    store.put(("alice",), "home", {"text": "Lives in New York"})
    first = store.get(("alice",), "home")
    store.put(("alice",), "home", {"text": "Lives in Lisbon", "since": 2024})
    second = store.get(("alice",), "home")
    assert second.value == {"text": "Lives in Lisbon", "since": 2024}
    assert second.created_at == first.created_at and second.updated_at > first.updated_at
    assert [m.id for m in store.memory(("alice",)).get_all()] == ["home"]  # not a second memory
    # put means replace: the old value is not kept as the memory's history, nor exported
    assert store.memory(("alice",)).get("home").history == ()
    exported = io.StringIO()
    store.memory(("alice",)).export(exported)
    assert "New York" not in exported.getvalue() and "Lisbon" in exported.getvalue()
    store.delete(("alice",), "home")
    assert store.get(("alice",), "home") is None
    store.put(("alice",), "again", {"text": "Has a cat"})
    store.put(("alice",), "again", None)  # a None value deletes too
    assert store.get(("alice",), "again") is None
    store.delete(("alice",), "never-existed")  # deleting nothing is not an error
    store.delete(("nobody",), "x")
    assert ("nobody",) not in store.list_namespaces()


def test_similar_items_under_different_keys_are_both_kept(store) -> None:
    store.put(("alice",), "a", {"text": "Prefers Python for backend work"})
    store.put(("alice",), "b", {"text": "prefers python for backend work!"})
    assert {i.key for i in store.search(("alice",))} == {"a", "b"}


def test_the_indexed_text_follows_the_value(store) -> None:
    store.put(("alice",), "c", {"content": "Writes Go at work", "kind": "note"})
    store.put(("alice",), "p", {"name": "Alice", "languages": ["Go", "Rust"]})
    store.put(
        ("alice",), "f", {"profile": {"bio": "Climbs on weekends"}, "id": 7}, index=["profile.bio"]
    )
    texts = {m.id: m.text for m in store.memory(("alice",)).get_all()}
    assert texts["c"] == "Writes Go at work"
    assert json.loads(texts["p"]) == {"name": "Alice", "languages": ["Go", "Rust"]}
    assert texts["f"] == "Climbs on weekends"


def test_bad_items_raise_naming_the_limit_and_a_batch_writes_nothing(store) -> None:
    with pytest.raises(InvalidInputError, match=r"value\['text'\] is 2001 characters; the max"):
        store.put(("alice",), "long", {"text": "x" * 2001})
    with pytest.raises(InvalidInputError, match=r"characters as JSON; the maximum is 30000"):
        store.put(("alice",), "big", {"text": "short", "blob": "y" * 30_000})
    with pytest.raises(InvalidInputError, match=r"1-256 printable characters"):
        store.put(("alice",), "k" * 257, {"text": "fine"})
    with pytest.raises(InvalidInputError, match=r"JSON data"):
        store.put(("alice",), "obj", {"text": "fine", "when": object()})
    with pytest.raises(InvalidInputError, match=r"not a string"):
        store.put(("alice",), "keys", {"text": "fine", "map": {1: "one"}})
    with pytest.raises(InvalidInputError, match=r"value\['text'\]|empty"):
        store.put(("alice",), "blank", {"text": "\x00\x01"})
    with pytest.raises(InvalidInputError, match=r"is 2001 characters"):
        store.batch(
            [
                PutOp(("alice",), "good", {"text": "Has two cats"}),
                PutOp(("bob",), "bad", {"text": "z" * 2001}),
            ]
        )
    assert store.get(("alice",), "good") is None
    assert store.search(("alice",)) == []


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (SearchOp(("alice",), filter={"n": {"$in": [1]}}), "unknown filter operator '\\$in'"),
        (
            SearchOp(("alice",), filter={"n": {"$gt": 0, "x": 1}}),
            "mixes operators with the field 'x'",
        ),
        (SearchOp(("alice",), filter={"m": {"a": {"$eq": 1, "b": 2}}}), "mixes operators"),
        (SearchOp(("alice",), filter=["n"]), "filter must be a dict"),  # type: ignore[arg-type]
        (SearchOp(("alice",), query=5), "query must be a string"),  # type: ignore[arg-type]
        (ListNamespacesOp((MatchCondition("infix", ("a",)),)), "unknown match type"),  # type: ignore[arg-type]
        (ListNamespacesOp(max_depth="2"), "max_depth must be"),  # type: ignore[arg-type]
    ],
)
def test_a_batch_with_a_bad_read_writes_nothing(store, bad, error) -> None:
    """Every op is checked before anything is written, reads too."""
    with pytest.raises(InvalidInputError, match=error):
        store.batch([PutOp(("alice",), "good", {"text": "Has two cats"}), bad])
    assert store.get(("alice",), "good") is None


def test_a_query_of_control_characters_only_is_no_query(store) -> None:
    """Nothing is left to search by once they are dropped: the search lists the items, as
    for a blank query (InMemoryStore returns items for any query), in a batch too."""
    results = store.batch(
        [
            PutOp(("alice",), "tea", {"text": "Likes green tea"}),
            SearchOp(("alice",), query="\x00\x01"),
        ]
    )
    assert [(i.key, i.score) for i in results[1]] == [("tea", None)]
    lone_surrogate = json.loads('"\\ud800"')
    assert [i.key for i in store.search(("alice",), query=lone_surrogate)] == ["tea"]
    assert [i.score for i in store.search(("alice",), query=" \u200b\ufeff ")] == [None]


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.put("alice", "k", {"text": "Prefers Python"}),  # type: ignore[arg-type]
        lambda s: s.get("alice", "k"),  # type: ignore[arg-type]
        lambda s: s.delete("alice", "k"),  # type: ignore[arg-type]
        lambda s: s.search("alice", query="Python"),  # type: ignore[arg-type]
        lambda s: s.list_namespaces(prefix="alice"),  # type: ignore[arg-type]
        lambda s: s.list_namespaces(suffix="alice"),  # type: ignore[arg-type]
        lambda s: s.batch([PutOp("alice", "k", {"text": "Prefers Python"})]),  # type: ignore[arg-type]
        lambda s: s.memory("alice"),  # type: ignore[arg-type]
    ],
)
def test_a_string_namespace_is_refused_not_split_into_letters(store, call) -> None:
    """``"alice"`` is not ``("a", "l", "i", "c", "e")``: every op refuses it."""
    store.put(("bob",), "k", {"text": "Has a dog"})
    with pytest.raises(InvalidNamespaceError, match=r"pass \('alice',\), not 'alice'"):
        call(store)
    assert store.list_namespaces() == [("bob",)]


def test_odd_values_keys_and_labels_are_no_storage_failure(store, db_path, model) -> None:
    """A number beyond a float's range fails a comparison (no crash of every search under
    the prefix); a key no item can have finds and deletes nothing; a blank label is refused
    wherever it is, so ``list_namespaces`` never lists a namespace the store then refuses."""
    store.put(("acme", "mallory"), "m", {"text": "Pays invoices", "amount": 10**400})
    store.put(("acme", "alice"), "a", {"text": "Pays rent", "amount": 5})
    found = store.search(("acme",), filter={"amount": {"$gt": 1}})
    assert [item.key for item in found] == ["a"]
    surrogate = json.loads('"\\ud800"')
    assert store.get(("acme", "alice"), surrogate) is None
    store.delete(("acme", "alice"), surrogate)
    for odd in ("note\t1", " padded", "line\nbreak", "k" * 300):  # no id: nothing to delete
        assert store.get(("acme", "alice"), odd) is None
        store.delete(("acme", "alice"), odd)
        store.put(("acme", "alice"), odd, None)
    assert store.get(("acme", "alice"), "a") is not None
    for namespace in ((" ", "team"), ("team", "  ")):
        with pytest.raises(InvalidNamespaceError, match="blank"):
            store.put(namespace, "k", {"text": "Has a dog"})
    # a user a wrapper made with a blank label is no namespace: never listed nor searched
    MemoryStore(f"acme{SEPARATOR} ", db_path=db_path, embedder=model).add("Has a cat")
    assert ("acme", " ") not in store.list_namespaces()
    assert ("acme", " ") not in [item.namespace for item in store.search(("acme",))]


def test_a_key_imported_from_elsewhere_is_read_and_deleted(store, db_path, model) -> None:
    """An export's ids are kept by ``import_``, and held to the rule ``put`` keys are: one
    with a tab or a newline is refused (the search tool and the CLI print ids)."""
    source = MemoryStore("alice", db_path=db_path / "elsewhere", embedder=model)
    source.add("Prefers Python for backend work", "preference")
    exported = io.StringIO()
    source.export(exported)
    line = json.loads(exported.getvalue().splitlines()[0])
    target = MemoryStore("alice", db_path=db_path, embedder=model)
    with pytest.raises(InvalidInputError, match="printable"):
        target.import_([json.dumps({**line, "id": "note\t1"})])
    target.import_([json.dumps({**line, "id": "notes/1 é"})])
    [item] = store.search(("alice",))
    assert item.key == "notes/1 é" and store.get(("alice",), item.key) is not None
    store.delete(("alice",), item.key)
    assert store.search(("alice",)) == []


def test_ttl_is_not_supported(store) -> None:
    assert store.supports_ttl is False
    with pytest.raises(NotImplementedError, match="TTL"):
        store.put(("alice",), "k", {"text": "Has a dog"}, ttl=5)
    with pytest.raises(NotImplementedError, match="TTL"):
        store.batch([PutOp(("alice",), "k", {"text": "Has a dog"}, ttl=5.0)])


# -- search ---------------------------------------------------------------------------------------


def test_semantic_search_ranks_by_meaning_above_the_floor(store, db_path, model) -> None:
    for key, value in (("python", PYTHON), ("peanuts", PEANUTS), ("run", MARATHON)):
        store.put(("alice",), key, value)
    found = store.search(("alice",), query="Which programming language should I use?")
    assert found[0].key == "python" and found[0].value == PYTHON
    assert [i.score for i in found] == sorted((i.score for i in found), reverse=True)
    assert store.search(("alice",), query="Do I have any food allergies?")[0].key == "peanuts"
    assert store.search(("alice",), query="What is 2+2?") == []  # nothing relevant
    everything = HeadroomStore(db_path=db_path, embedder=model, min_score=-1.0)
    assert len(everything.search(("alice",), query="What is 2+2?")) == 3


def test_filters_limit_offset_and_listing(store) -> None:
    for n in range(6):
        store.put(
            ("alice",),
            f"k{n}",
            {"text": f"Practised the piano on day {n}", "day": n, "meta": {"even": n % 2 == 0}},
        )
    store.put(("alice",), "other", {"text": "Practised the violin", "day": 9})
    listed = store.search(("alice",))
    assert [i.key for i in listed] == ["k0", "k1", "k2", "k3", "k4", "k5", "other"]
    assert all(i.score is None for i in listed)
    assert [i.key for i in store.search(("alice",), limit=2, offset=3)] == ["k3", "k4"]
    assert [i.key for i in store.search(("alice",), filter={"day": {"$gte": 4}})] == [
        "k4",
        "k5",
        "other",
    ]
    assert [i.key for i in store.search(("alice",), filter={"meta": {"even": True}})] == [
        "k0",
        "k2",
        "k4",
    ]
    assert [i.key for i in store.search(("alice",), filter={"day": {"$ne": 9, "$lt": 2}})] == [
        "k0",
        "k1",
    ]
    piano = store.search(("alice",), query="playing the piano", filter={"meta": {"even": False}})
    assert sorted(i.key for i in piano) == ["k1", "k3", "k5"]
    assert len(store.search(("alice",), query="playing the piano", limit=2, offset=1)) == 2
    with pytest.raises(InvalidInputError, match="unknown filter operator"):
        store.search(("alice",), filter={"day": {"$regex": "1"}})


def test_a_filtered_search_over_several_namespaces_merges_their_best_matches(
    db_path, model, monkeypatch
) -> None:
    """Enough matches in one namespace do not end the search while another namespace's
    unread memories could score higher: the result is each namespace's own search merged by
    score. Without a filter, one search per namespace suffices."""
    store = HeadroomStore(db_path=db_path, embedder=model, min_score=-1.0)
    for n in range(12):  # fill ("team", "b")'s first page with items the filter drops
        store.put(("team", "b"), f"x{n}", {"text": "Loves eating fresh fruit", "tag": "x"})
    store.put(
        ("team", "b"), "wanted", {"text": "Eats apples and bananas every morning", "tag": "y"}
    )
    for n in range(20):
        store.put(
            ("team", "a"), f"a{n}", {"text": f"Works as an accountant in office {n}", "tag": "y"}
        )

    def merged(limit: int) -> list[tuple[tuple[str, ...], str, float]]:
        found = [
            (item.namespace, item.key, item.score)
            for namespace in (("team", "a"), ("team", "b"))
            for item in store.search(namespace, query="fresh fruit", filter={"tag": "y"}, limit=100)
        ]
        return sorted(found, key=lambda hit: -hit[2])[:limit]

    found = store.search(("team",), query="fresh fruit", filter={"tag": "y"}, limit=10)
    assert (found[0].namespace, found[0].key) == (("team", "b"), "wanted")
    expected = merged(10)
    assert [(i.namespace, i.key) for i in found] == [hit[:2] for hit in expected]
    assert [i.score for i in found] == pytest.approx([hit[2] for hit in expected], abs=1e-5)

    searches: list[int] = []
    real_search = MemoryStore.search

    def counted(self, query, top_k=5, *args, **kwargs):  # the real search, counted
        searches.append(top_k)
        return real_search(self, query, top_k, *args, **kwargs)

    monkeypatch.setattr(MemoryStore, "search", counted)
    assert len(store.search(("team",), query="fresh fruit", limit=10)) == 10
    assert searches == [10, 10, 10]  # ("team",) itself and its two: one page each, none deeper


def test_list_namespaces(store, db_path, model) -> None:
    for namespace in [("alice",), ("alice", "notes"), ("acme", "bob"), ("acme", "carol", "work")]:
        store.put(namespace, "k", {"text": "Likes hiking"})
    MemoryStore("a..b", db_path=db_path, embedder=model).add("No namespace maps to me")
    assert store.list_namespaces() == [
        ("acme", "bob"),
        ("acme", "carol", "work"),
        ("alice",),
        ("alice", "notes"),
    ]
    assert store.list_namespaces(prefix=("acme",)) == [("acme", "bob"), ("acme", "carol", "work")]
    assert store.list_namespaces(suffix=("work",)) == [("acme", "carol", "work")]
    assert store.list_namespaces(prefix=("acme", "*")) == [
        ("acme", "bob"),
        ("acme", "carol", "work"),
    ]
    assert store.list_namespaces(max_depth=1) == [("acme",), ("alice",)]
    assert store.list_namespaces(limit=1, offset=1) == [("acme", "carol", "work")]


@pytest.mark.asyncio
async def test_async_methods_run_the_same_operations(store) -> None:
    await store.aput(("alice",), "python", PYTHON)
    await store.aput(("bob",), "peanuts", PEANUTS)
    assert (await store.aget(("alice",), "python")).value == PYTHON
    found = await store.asearch(("alice",), query="Which language for my API?")
    assert [i.key for i in found] == ["python"]
    assert await store.alist_namespaces() == [("alice",), ("bob",)]
    await store.adelete(("alice",), "python")
    assert await store.aget(("alice",), "python") is None
    results = await store.abatch([PutOp(("alice",), "x", {"text": "Owns a kayak"})])
    assert results == [None] and (await store.aget(("alice",), "x")).value["text"] == "Owns a kayak"
    # concurrent calls from one event loop
    await asyncio.gather(
        *(store.aput(("alice",), f"c{n}", {"text": f"Fact {n}"}) for n in range(4))
    )
    assert len(await store.asearch(("alice",), limit=100)) == 5


# -- isolation ------------------------------------------------------------------------------------


def test_a_namespace_never_reaches_another_users_memories(store) -> None:
    store.put(("alice",), "secret", {"text": "Alice's door code is 4321"})
    store.put(("bob",), "secret", {"text": "Bob's door code is 9876"})
    store.put(("alicex",), "secret", {"text": "Alicex's door code is 1111"})
    store.put(("alice", "work"), "desk", {"text": "Alice sits on floor 3"})
    assert store.get(("alice",), "secret").value["text"] == "Alice's door code is 4321"
    assert store.get(("bob",), "secret").value["text"] == "Bob's door code is 9876"
    found = store.search(("alice",), query="door code", limit=10)
    assert (found[0].namespace, found[0].key) == (("alice",), "secret")
    assert {i.namespace for i in found} <= {("alice",), ("alice", "work")}  # never bob's
    listed = store.search(("alice",), limit=10)
    assert {i.namespace for i in listed} == {("alice",), ("alice", "work")}  # and descendants
    assert store.search(("alice", "work"), limit=10)[0].value["text"] == "Alice sits on floor 3"
    store.delete(("alice",), "secret")
    assert store.get(("bob",), "secret") is not None
    assert store.get(("alicex",), "secret") is not None
    with pytest.raises(InvalidNamespaceError, match="empty prefix would cover every user"):
        store.search((), query="door code")
    with pytest.raises(ValueError, match="period"):
        store.get(("alice.bob",), "secret")  # LangGraph's own check: no dots in labels
    with pytest.raises(ValueError, match="empty"):
        store.put((), "k", {"text": "x"})


def test_a_dotted_wrapper_user_is_never_inside_a_namespace(
    store, db_path, model, openai_server, model_says
) -> None:
    """Users "alice" and "alice.smith" (an id with a dot, as an e-mail has) of one app: the
    namespace ("alice",) is alice's memories only, never the other user's."""
    dotted = with_fast_memory(
        openai_server.client(), user_id="alice.smith", db_path=db_path, embedder=model
    )
    model_says.answer = "Noted."
    model_says.memories = [{"text": "Has a dentist appointment on Friday", "category": "context"}]
    dotted.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "I have a dentist appointment"}]
    )
    assert dotted.memory.flush(30)
    MemoryStore("alice.smith", db_path=db_path, embedder=model).add("Lives in Oslo")
    MemoryStore("alice", db_path=db_path, embedder=model).add(
        "Has a piano lesson on Friday", category="context"
    )
    found = store.search(("alice",), query="Do I have any appointments this week?", limit=10)
    assert [(i.namespace, i.value["text"]) for i in found] == [
        (("alice",), "Has a piano lesson on Friday")
    ]
    listed = store.search(("alice",), limit=10)
    assert [(i.namespace, i.value["text"]) for i in listed] == [
        (("alice",), "Has a piano lesson on Friday")
    ]
    assert store.list_namespaces() == [("alice",)]
    assert store.list_namespaces(prefix=("alice",)) == [("alice",)]
    # a multi-label namespace is not the dotted id either, and wrappers reach it by its user
    store.put(("alice", "smith"), "k", {"text": "Plays chess"})
    assert namespace_user(("alice", "smith")) == "alice\x1fsmith"
    smith = MemoryStore("alice.smith", db_path=db_path, embedder=model)
    assert sorted(m.text for m in smith.get_all()) == [
        "Has a dentist appointment on Friday",
        "Lives in Oslo",
    ]
    owner = MemoryStore(namespace_user(("alice", "smith")), db_path=db_path, embedder=model)
    assert [m.text for m in owner.get_all()] == ["Plays chess"]
    assert store.list_namespaces() == [("alice",), ("alice", "smith")]
    with pytest.raises(InvalidNamespaceError, match="unit separator"):
        store.put(("alice\x1fsmith",), "k", {"text": "x"})


def test_memories_learned_by_a_wrapper_are_items_and_items_are_recalled(
    store, db_path, model, openai_server, model_says
) -> None:
    client = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=model
    )
    model_says.answer, model_says.memories = "Noted.", [PYTHON]
    client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "I prefer Python for backend work"}]
    )
    assert client.memory.flush(30)
    learned = client.memory.get_all()[0]
    items = store.search(("alice",))
    assert [(i.key, i.value) for i in items] == [(learned.id, PYTHON)]
    assert store.search(("alice",), query="Which language should I pick?")[0].key == learned.id
    assert store.search(("bob",)) == []
    # and what an agent puts, the wrapper recalls
    store.put(("alice",), "editor", {"text": "Uses Neovim as their editor", "category": "fact"})
    model_says.memories = []
    client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Which text editor do I use?"}]
    )
    assert "Uses Neovim as their editor" in request_text(openai_server.requests[-1].body)
    # a wrapper's supersede rewrites an item's text: its text field shows the new text
    store.put(("alice",), "home", {"text": "Lives in New York", "floor": 3})
    client.memory.supersede("home", "Moved from New York to Lisbon")
    assert store.get(("alice",), "home").value == {
        "text": "Moved from New York to Lisbon",
        "floor": 3,
    }


def test_a_rewritten_item_indexed_by_one_field_keeps_its_other_fields(store) -> None:
    """``index`` naming one top-level string field makes it the item's text field, as
    ``text`` is without ``index``; the text of a nested path has no field to show it in."""
    store.put(("alice",), "a", {"text": "Lives in New York", "floor": 3}, index=["text"])
    store.put(("alice",), "b", {"where": "Lives in New York", "floor": 3}, index=["where"])
    store.put(("alice",), "c", {"home": {"city": "Lives in New York"}}, index=["home.city"])
    memory = store.memory(("alice",))  # what a wrapper or a memory tool does
    for key in ("a", "b", "c"):
        memory.supersede(key, "Moved from New York to Lisbon")
    assert store.get(("alice",), "a").value == {"text": "Moved from New York to Lisbon", "floor": 3}
    assert store.get(("alice",), "b").value == {
        "where": "Moved from New York to Lisbon",
        "floor": 3,
    }
    assert store.get(("alice",), "c").value == {
        "text": "Moved from New York to Lisbon",
        "category": "fact",
    }


def test_items_persist_across_processes(db_path, model) -> None:
    run_python(
        f"""
        from headroom_memory_integrations.langchain import HeadroomStore, namespace_user
        store = HeadroomStore(db_path={str(db_path)!r})
        store.put(("alice",), "lang", {{"text": "Prefers Python for backend work", "n": [1, 2]}})
        store.put(("bob",), "lang", {{"text": "Prefers Haskell"}})
        """
    )
    store = HeadroomStore(db_path=db_path, embedder=model)
    assert store.get(("alice",), "lang").value == {
        "text": "Prefers Python for backend work",
        "n": [1, 2],
    }
    assert [i.key for i in store.search(("alice",), query="what language for an API?")] == ["lang"]
    assert store.list_namespaces() == [("alice",), ("bob",)]
    assert store.get(("bob",), "lang").value == {"text": "Prefers Haskell"}


# -- in LangGraph ---------------------------------------------------------------------------------


@tool
def save_note(note: str, runtime: ToolRuntime) -> str:
    """Save a note about the user for later conversations."""
    user = runtime.config["configurable"]["user_id"]
    runtime.store.put((user,), "note", {"text": note, "category": "preference"})
    return "saved"


@tool
def find_notes(query: str, runtime: ToolRuntime) -> str:
    """Find the user's notes relevant to a query."""
    user = runtime.config["configurable"]["user_id"]
    return "\n".join(i.value["text"] for i in runtime.store.search((user,), query=query, limit=3))


@tool
async def afind_notes(query: str, runtime: ToolRuntime) -> str:
    """Find the user's notes relevant to a query (async)."""
    user = runtime.config["configurable"]["user_id"]
    found = await runtime.store.asearch((user,), query=query, limit=3)
    return "\n".join(i.value["text"] for i in found)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_create_agent_tools_read_and_write_the_store(mode, db_path, model, openai_server) -> None:
    alice = {"configurable": {"user_id": "alice"}}
    openai_server.script(
        Reply.tool_call("save_note", {"note": "Prefers Python for backend work"}),
        "Saved your preference.",
    )
    agent = create_agent(
        chat_model(openai_server),
        tools=[save_note],
        store=HeadroomStore(db_path=db_path, embedder=model),
    )
    first = agent.invoke({"messages": [{"role": "user", "content": "I like Python"}]}, alice)
    assert [m.content for m in tool_messages(first)] == ["saved"]
    assert first["messages"][-1].content == "Saved your preference."

    # a new store object and a new agent on the same folder: the note is there
    reader = find_notes if mode == "sync" else afind_notes
    openai_server.script(
        Reply.tool_call(reader.name, {"query": "which programming language"}), "Use Python."
    )
    llm = chat_model(openai_server)
    agent = create_agent(llm, tools=[reader], store=HeadroomStore(db_path=db_path, embedder=model))
    question = {"messages": [{"role": "user", "content": "Which language should I use?"}]}
    bob = {"configurable": {"user_id": "bob"}}

    def ask_twice() -> tuple[dict, dict]:
        """Alice's question, then bob's (his run reaches his namespace only)."""
        second = agent.invoke(question, alice)
        openai_server.script(Reply.tool_call(reader.name, {"query": "programming language"}), "?")
        return second, agent.invoke(question, bob)

    async def aask_twice() -> tuple[dict, dict]:
        second = await agent.ainvoke(question, alice)
        openai_server.script(Reply.tool_call(reader.name, {"query": "programming language"}), "?")
        return second, await agent.ainvoke(question, bob)

    second, third = ask_twice() if mode == "sync" else run_async(aask_twice(), llm)
    assert [m.content for m in tool_messages(second)] == ["Prefers Python for backend work"]
    assert "Prefers Python for backend work" in request_text(openai_server.requests[-3].body)
    assert [m.content for m in tool_messages(third)] == [""]


class QA(TypedDict):
    user: str
    question: str
    answer: str


def test_a_state_graph_compiled_with_the_store(db_path, model) -> None:
    def remember(state: QA, runtime: Runtime) -> dict:
        runtime.store.put((state["user"],), "diet", {"text": "Is vegetarian", "category": "fact"})
        return {}

    def answer(state: QA, store: BaseStore) -> dict:
        found = store.search((state["user"],), query=state["question"], limit=1)
        return {"answer": found[0].value["text"] if found else "nothing"}

    builder = StateGraph(QA)
    builder.add_node("remember", remember)
    builder.add_node("answer", answer)
    builder.add_edge(START, "remember")
    builder.add_edge("remember", "answer")
    builder.add_edge("answer", END)
    graph = builder.compile(store=HeadroomStore(db_path=db_path, embedder=model))
    out = graph.invoke({"user": "alice", "question": "Can I order the steak?", "answer": ""})
    assert out["answer"] == "Is vegetarian"
    out = asyncio.run(graph.ainvoke({"user": "carol", "question": "Do I eat meat?", "answer": ""}))
    assert out["answer"] == "Is vegetarian"
    assert HeadroomStore(db_path=db_path, embedder=model).list_namespaces() == [
        ("alice",),
        ("carol",),
    ]


@pytest.mark.server
def test_the_store_raises_storage_error_while_its_chroma_server_is_down(
    tmp_path, model, openai_server
) -> None:
    """Unlike the chat-model wrapper, which answers without memories, the store raises
    StorageError (a HeadroomMemoryError) from every call while its Chroma server is down, at
    once after the first failure (the storage is held to be down a while): an agent's tool
    that reads it fails the agent's run unless it catches the error. docs/langchain.md says
    so; this pins it."""
    from conftest import ChromaServer

    from headroom_memory_integrations import StorageError
    from headroom_memory_integrations.langchain import MemoryChatModel

    server = ChromaServer(tmp_path / "chroma")
    try:
        store = HeadroomStore(db_path=server.url, embedder=model)
        store.put(("alice",), "language", PYTHON)
    finally:
        server.stop()
    calls = {
        "get": lambda: store.get(("alice",), "language"),
        "put": lambda: store.put(("alice",), "diet", PEANUTS),
        "search": lambda: store.search(("alice",), query="which programming language"),
        "search without a query": lambda: store.search(("alice",)),
        "delete": lambda: store.delete(("alice",), "language"),
        "list_namespaces": lambda: store.list_namespaces(),
        "aget": lambda: asyncio.run(store.aget(("alice",), "language")),
        "asearch": lambda: asyncio.run(store.asearch(("alice",), query="language")),
    }
    for name, call in calls.items():
        with pytest.raises(StorageError):
            call()
            pytest.fail(f"{name} did not raise")

    openai_server.script(Reply.tool_call("find_notes", {"query": "programming language"}), "?")
    agent = create_agent(chat_model(openai_server), tools=[find_notes], store=store)
    question = {"messages": [{"role": "user", "content": "Which language should I use?"}]}
    with pytest.raises(StorageError):
        agent.invoke(question, {"configurable": {"user_id": "alice"}})

    openai_server.reset()
    openai_server.script("Any language you like.")
    chat = MemoryChatModel(
        model=chat_model(openai_server), user_id="alice", db_path=server.url, embedder=model
    )
    assert chat.invoke("Which language should I use?").content == "Any language you like."
    assert chat.memory.counters["inject_failures"] == 1


@pytest.mark.parametrize("min_score", [float("nan"), "0.3"])
def test_a_floor_that_is_not_a_number_is_refused_at_once(db_path, model, min_score) -> None:
    """Not at the first search of some user, later: the store is refused as it is made."""
    with pytest.raises(InvalidInputError, match="min_score must be a finite number"):
        HeadroomStore(db_path=db_path, embedder=model, min_score=min_score)
    assert not db_path.exists() or not any(db_path.iterdir())
