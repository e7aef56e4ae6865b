"""Rich display: memories, search results, stats, stores and memory clients render as HTML
tables in Jupyter, every user-supplied value escaped; the containers stay plain lists and dicts.
"""

from __future__ import annotations

import copy
import json
import pickle
import pprint
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import HashEmbedder
from IPython.core.formatters import DisplayFormatter

from headroom_memory_integrations import Memory, MemoryStore, SearchResult
from headroom_memory_integrations.cli import _table as cli_table
from headroom_memory_integrations.display import MemoryList, MemoryStats, SearchResults
from headroom_memory_integrations.openai import with_fast_memory
from headroom_memory_integrations.testing import ScriptedOpenAIServer

HOSTILE = [
    '<script>alert("memory")</script>',
    '"><img src=x onerror=alert(1)>',
    "</td></tr></table><iframe src='javascript:alert(2)'></iframe>",
    "&lt;b&gt;already escaped&lt;/b&gt; &amp; &#60;i&#62;",
    "<!-- hidden --><style>body { display: none }</style>",
]
OUR_TAGS = {"table", "caption", "thead", "tbody", "tr", "th", "td"}
OUR_ATTRIBUTES = {"class", "style"}


class Markup(HTMLParser):
    """The tags, attributes and text (per cell or caption) of an HTML fragment, checking
    that tags nest."""

    def __init__(self, fragment: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: set[str] = set()
        self.comments: list[str] = []
        self.cells: list[str] = []
        self._open: list[str] = []
        self._cell: list[str] | None = None
        self.feed(fragment)
        self.close()
        assert not self._open, f"unclosed tags {self._open}"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes |= {name for name, _ in attrs}
        self._open.append(tag)
        if tag in ("td", "th", "caption"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        assert self._open and self._open[-1] == tag, f"</{tag}> closes {self._open}"
        self._open.pop()
        if tag in ("td", "th", "caption") and self._cell is not None:
            self.cells.append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_comment(self, data: str) -> None:
        self.comments.append(data)

    @property
    def text(self) -> str:
        return "\n".join(self.cells)


def inert(fragment: str) -> Markup:
    """Parse ``fragment`` and check that it holds only our table markup."""
    markup = Markup(fragment)
    assert set(markup.tags) <= OUR_TAGS, set(markup.tags) - OUR_TAGS
    assert markup.attributes <= OUR_ATTRIBUTES, markup.attributes - OUR_ATTRIBUTES
    assert not markup.comments
    return markup


def jupyter_html(value: object) -> str:
    """What IPython's display machinery (as in a Jupyter kernel) renders as HTML."""
    data, _ = DisplayFormatter().format(value)
    assert "text/html" in data, f"{type(value).__name__} has no HTML view"
    return data["text/html"]


@pytest.fixture
def hostile_store(db_path: Path) -> MemoryStore:
    """A store whose user id, texts and metadata are all markup."""
    store = MemoryStore(HOSTILE[0], db_path=db_path, embedder=HashEmbedder())
    for index, text in enumerate(HOSTILE):
        store.add(f"alert {index} {text}", category="fact", metadata={HOSTILE[1]: text})
    return store


# -- memories ---------------------------------------------------------------------------------


def test_a_memory_renders_as_a_table_with_its_text_as_text(hostile_store: MemoryStore) -> None:
    memory = hostile_store.get_all()[0]
    markup = inert(jupyter_html(memory))
    assert memory.text in markup.cells
    assert any(HOSTILE[1] in cell and HOSTILE[0] in cell for cell in markup.cells)  # metadata
    assert "fact" in markup.cells and "manual" in markup.cells


def test_a_memory_reads_well_as_plain_text(hash_store: MemoryStore) -> None:
    memory = hash_store.add("Prefers Python", category="preference", metadata={"app": "cli"})
    memory = hash_store.supersede(memory.id, "Prefers Rust")
    shown = repr(memory)
    assert shown.startswith(f"Memory(id={memory.id!r}, user_id='alice', text='Prefers Rust', ")
    assert "category='preference', source='manual', updated_at='" in shown
    assert "metadata={'app': 'cli'}, history=['Prefers Python'])" in shown
    assert "mappingproxy" not in shown and "datetime.datetime" not in shown
    assert str(memory) == shown
    (result,) = hash_store.search("Prefers Rust", min_score=-1.0)
    assert repr(result) == f"SearchResult(memory={shown}, score={result.score!r})"


def test_a_superseded_memory_shows_what_it_replaced(hash_store: MemoryStore) -> None:
    old = hash_store.add("Lives in <b>New York</b>")
    moved = hash_store.supersede(old.id, "Moved to San Francisco")
    markup = inert(jupyter_html(moved))
    assert "Moved to San Francisco" in markup.cells
    assert "Lives in <b>New York</b>" in markup.cells


def test_times_given_with_an_offset_are_kept_and_shown_in_utc(hash_store: MemoryStore) -> None:
    """A time with an offset (an imported line, ``said_at``) came back as given from get(),
    search() and add_many() (the store's cache of what it wrote), and a notebook showed its
    wall time labelled UTC: "2026-02-01 23:30 UTC" for 07:30 UTC on 2 February."""
    line = {"id": "b" * 32, "text": "Works at Acme as a welder"}
    line["created_at"] = line["updated_at"] = "2026-02-01T23:30:00-08:00"
    hash_store.import_([json.dumps(line)])
    [added] = hash_store.add_many(["Plays the viola"], said_at="2025-12-01T20:00:00-08:00")
    [found] = hash_store.search("Works at Acme as a welder", min_score=-1.0, top_k=1)
    utc = timezone.utc
    for memory in (hash_store.get("b" * 32), found.memory, added):
        assert memory.updated_at.utcoffset() == timedelta(0)
        assert memory.created_at.utcoffset() == timedelta(0)
    assert found.memory.updated_at == datetime(2026, 2, 2, 7, 30, tzinfo=utc)
    assert added.updated_at.replace(microsecond=0) == datetime(2025, 12, 2, 4, 0, tzinfo=utc)
    assert "2026-02-02 07:30 UTC" in inert(jupyter_html(found)).cells
    assert "2025-12-02 04:00 UTC" in inert(jupyter_html(added)).cells
    # a Memory made by hand with an offset is shown in UTC too, in a notebook and the CLI
    pacific = timezone(timedelta(hours=-8))
    made = replace(added, updated_at=datetime(2026, 2, 1, 23, 30, tzinfo=pacific))
    assert "2026-02-02 07:30 UTC" in inert(jupyter_html(made)).cells
    assert "2026-02-02 07:30" in cli_table([made])
    assert "updated_at='2026-02-02T07:30:00+00:00'" in repr(made)


def test_get_all_is_a_list_shown_as_one_table(hostile_store: MemoryStore) -> None:
    memories = hostile_store.get_all()
    assert isinstance(memories, MemoryList) and isinstance(memories, list)
    assert memories == list(memories) and len(memories) == len(HOSTILE)
    markup = inert(jupyter_html(memories))
    assert markup.tags.count("table") == 1
    for index, text in enumerate(HOSTILE):
        assert f"alert {index} {text}" in markup.cells
    assert f"{len(HOSTILE)} memories of {HOSTILE[0]}" in markup.text  # the caption
    assert repr(memories) == repr(list(memories))


# -- search results ---------------------------------------------------------------------------


def test_search_results_are_a_list_shown_with_scores_and_floor(
    hostile_store: MemoryStore,
) -> None:
    results = hostile_store.search(HOSTILE[2], top_k=3, min_score=-1.0)
    assert isinstance(results, SearchResults) and isinstance(results, list)
    assert len(results) == 3
    assert results == [(r.memory, r.score) for r in results]
    memory, score = results[0]
    assert isinstance(memory, Memory) and isinstance(score, float)

    html = jupyter_html(results)
    markup = inert(html)
    assert markup.tags.count("tr") == 1 + 3  # header and one row per result
    assert f"{results[0].score:.3f}" in markup.cells
    assert all(r.memory.text in markup.cells for r in results)
    caption = markup.text  # the query is user data too
    assert repr(HOSTILE[2]) in caption and "relevance floor: similarity ≥ -1" in caption


def test_no_results_still_compare_equal_to_an_empty_list(hash_store: MemoryStore) -> None:
    hash_store.add("Prefers Python for backend work")
    results = hash_store.search("zzz qqq")
    assert results == [] and not results
    assert "0 results for 'zzz qqq'" in inert(jupyter_html(results)).text


def test_one_search_result_renders_alone(hostile_store: MemoryStore) -> None:
    (result,) = hostile_store.search(HOSTILE[4], top_k=1, min_score=-1.0)
    assert isinstance(result, SearchResult)
    markup = inert(jupyter_html(result))
    assert result.memory.text in markup.cells


def test_search_results_copy_and_serialize_like_a_list(hash_store: MemoryStore) -> None:
    hash_store.add("Prefers Python for backend work")
    results = hash_store.search("Python backend", min_score=-1.0)
    clone = copy.copy(results)
    assert clone == results and clone.query == "Python backend"
    assert results[:1] == [results[0]] and type(results[:1]) is list
    as_json = json.dumps([(m.to_dict(), s) for m, s in results])
    assert json.loads(as_json)[0][0]["text"] == "Prefers Python for backend work"
    assert repr(results) == repr(list(results))


# -- stats ------------------------------------------------------------------------------------


def test_stats_is_a_dict_in_every_way(hostile_store: MemoryStore) -> None:
    stats = hostile_store.stats()
    assert isinstance(stats, MemoryStats) and isinstance(stats, dict)
    plain = dict(stats)
    assert stats == plain
    assert json.dumps(stats) == json.dumps(plain)
    assert pickle.loads(pickle.dumps(stats)) == plain
    assert repr(stats) == repr(plain)
    assert pprint.pformat(stats) == pprint.pformat(plain)
    assert stats["total_memories"] == len(HOSTILE)


def test_stats_render_as_a_table_with_nested_counts(hostile_store: MemoryStore) -> None:
    stats = hostile_store.stats()
    markup = inert(jupyter_html(stats))
    assert HOSTILE[0] in markup.cells  # the user id, escaped
    assert f"preference: 0, fact: {len(HOSTILE)}, context: 0" in markup.cells
    assert "total_memories" in markup.cells


# -- the store and the client -----------------------------------------------------------------


def test_a_store_shows_its_user_storage_and_settings(tmp_path: Path) -> None:
    folder = tmp_path / "<b>memories</b>"
    store = MemoryStore(HOSTILE[1], db_path=folder, embedder=HashEmbedder())
    markup = inert(jupyter_html(store))
    assert HOSTILE[1] in markup.cells
    assert any(str(folder) in cell for cell in markup.cells)
    assert "test-hash (64 dimensions)" in markup.cells
    assert "MemoryStore(" in repr(store)  # the plain repr is unchanged


def test_a_memory_client_shows_no_api_key(tmp_path: Path) -> None:
    with ScriptedOpenAIServer() as server:
        client = with_fast_memory(
            server.client(api_key="sk-secret-key-123"),
            user_id=HOSTILE[3],
            db_path=tmp_path / "memories",
            embedder=HashEmbedder(),
        )
        html = jupyter_html(client)
    markup = inert(html)
    assert "sk-secret" not in html and "sk-secret" not in repr(client)
    assert "with_fast_memory" in markup.cells and "OpenAI" in markup.cells
    assert HOSTILE[3] in markup.cells
    assert repr(client) == f"with_fast_memory(OpenAI, user_id={HOSTILE[3]!r})"
