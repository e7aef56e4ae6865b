"""The `headroom-memory` command: tables for people, --json for scripts, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from headroom_memory_integrations import MemoryStore
from headroom_memory_integrations.cli import main


def _exit_status(argv: list[str]) -> int | str | None:
    """What ``main`` returns, or the status argparse exits with."""
    try:
        return main(argv)
    except SystemExit as exited:
        return exited.code


@pytest.fixture
def run(db_path, capsys):
    def invoke(*args: str, user: str = "alice") -> tuple[int | str | None, str, str]:
        code = _exit_status([*args, "--user", user, "--db", str(db_path)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


def test_add_search_list_stats_as_tables(run) -> None:
    code, out, _ = run("add", "Prefers Python for backend work", "--category", "preference")
    assert code == 0 and out.startswith("stored ") and "(preference)" in out
    run("add", "Works at a fintech startup", "--meta", "source=onboarding")
    code, out, _ = run("search", "Which language should I use?")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["score", "id", "category", "noted", "(UTC)", "text"]
    assert "Prefers Python for backend work" in lines[2]
    code, out, _ = run("list")
    assert code == 0 and len(out.splitlines()) == 4
    code, out, _ = run("stats")
    assert "total_chunks" in out and "2" in out
    code, out, _ = run("search", "What is 2+2?")
    assert code == 0 and "(no memories)" in out


def test_json_output_for_scripts(run) -> None:
    _, out, _ = run("add", "Is a vegetarian", "--json", "--keys", "diet, no meat")
    added = json.loads(out)
    assert added["text"] == "Is a vegetarian" and added["user_id"] == "alice"
    assert added["keys"] == ["diet", "no meat"]
    _, out, _ = run("search", "What should I cook for dinner?", "--json", "--min-score", "0.1")
    results = json.loads(out)
    assert results[0]["id"] == added["id"] and results[0]["score"] > 0.1
    _, out, _ = run("list", "--json", "--category", "fact")
    assert [m["id"] for m in json.loads(out)] == [added["id"]]
    _, out, _ = run("stats", "--json")
    assert json.loads(out)["total_chunks"] == 1


def test_delete_by_short_id_clear_export_import(run, tmp_path: Path) -> None:
    _, out, _ = run("add", "Has two cats", "--json")
    memory_id = json.loads(out)["id"]
    run("add", "Runs marathons")
    export = tmp_path / "alice.jsonl"
    assert run("export", str(export))[0] == 0
    assert len(export.read_text().splitlines()) == 2
    code, out, _ = run("delete", memory_id[:12])
    assert code == 0 and out == f"deleted {memory_id[:12]}\n"
    _, out, _ = run("add", "Is on call this week", "--json")
    on_call = json.loads(out)["id"]
    code, out, _ = run("delete", on_call[:12], "--json")
    assert code == 0 and json.loads(out) == {"deleted": on_call}  # the whole id
    assert len(json.loads(run("list", "--json")[1])) == 1
    one = tmp_path / "one.jsonl"
    assert run("export", str(one))[1] == f"exported 1 memory to {one}\n"
    code, _, err = run("clear")  # no terminal to confirm on: refused
    assert code == 1 and "--yes" in err
    code, out, _ = run("clear", "--yes")
    assert code == 0 and out == "cleared 1 memory of user 'alice'\n"
    code, out, _ = run("import", str(export), user="bob")
    assert code == 0 and out == "imported 2 memories: 2 stored\n"
    assert run("import", str(one), user="carol")[1] == "imported 1 memory: 1 stored\n"
    _, out, _ = run("export", user="bob")  # to stdout
    assert {json.loads(line)["user_id"] for line in out.splitlines()} == {"bob"}


def test_import_as_is_merges_no_two_memories(run, tmp_path: Path) -> None:
    """``import --as-is`` writes each memory by its id: two that say the same stay two (as
    LangChain's HeadroomStore keeps items under their keys); a plain import merges them."""
    export = tmp_path / "two.jsonl"
    lines = []
    for memory_id in ("pet", "pet_backup"):
        run("add", "Has a dog named Rex", user=memory_id)  # two users: never consolidated
        _, out, _ = run("export", user=memory_id)
        lines.append(json.dumps({**json.loads(out), "id": memory_id}))
    export.write_text("\n".join(lines) + "\n")
    code, out, _ = run("import", "--as-is", str(export), user="bob")
    assert code == 0 and out == "imported 2 memories: 2 stored\n"
    assert sorted(m["id"] for m in json.loads(run("list", "--json", user="bob")[1])) == [
        "pet",
        "pet_backup",
    ]
    assert run("import", str(export), user="carol")[1] == (
        "imported 2 memories: 1 stored, 1 already known\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("delete", "0" * 32), "no memory with id"),
        (("delete", "f" * 12), "no memory with id"),
        (("import", "/no/such/file.jsonl"), "No such file"),
    ],
)
def test_errors_exit_1_with_a_message(run, args, message) -> None:
    assert run("add", "Has a store already")[0] == 0
    code, _, err = run(*args)
    assert code == 1 and message in err and err.startswith("headroom-memory: error:")


def test_delete_of_an_unknown_id_names_the_user_as_typed(run) -> None:
    """As every other message of the command does (``cleared 2 memories of user 'bob'``), with
    what does not print escaped; the library's message names the user by the hash its logs use."""
    for user in ("alice", "bob\u202eevil"):
        assert run("add", "Likes tea", user=user)[0] == 0
        code, out, err = run("delete", "0123456789abcdef", user=user)
        assert code == 1 and out == ""
        assert err == (
            f"headroom-memory: error: user {user!r} has no memory with id '0123456789abcdef'\n"
        )
        assert "\u202e" not in err


def _one_line_usage_error(err: str, message: str) -> None:
    """A usage error: one ``...: error: ...`` line (argparse's usage line may precede it)."""
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], err
    assert errors[0].startswith("headroom-memory") and errors[0] == err.splitlines()[-1]
    assert "Traceback" not in err


_METAS = [arg for i in range(33) for arg in ("--meta", f"key{i}=v")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("add", "x", "--category", "hobby"), "invalid choice"),
        (("add", "ok", "--meta", "novalue"), "KEY=VALUE"),
        (("add", "ok", "--meta", "=value"), "KEY=VALUE"),
        (("add", "ok", "--meta", "k=" + "v" * 1001), "the maximum is 1000"),
        (("add", "ok", *_METAS), "metadata has 33 keys; the maximum is 32"),
        (("add", ""), "argument text: the memory text is empty"),
        (("add", " \t\n"), "the memory text is empty"),
        (("add", "x" * 3000), "the maximum is 2000"),
        (("add", "ok", "--keys", "x" * 200), "the maximum is 120"),
        (("add", "ok", "--keys", "a,b,c,d,e,f,g,h,i"), "9 keys; the maximum is 8"),
        (("search", ""), "argument query: the query is empty"),
        (("search", "   "), "the query is empty"),
        (("search", "q" * 2001), "the maximum is 2000"),
        (("search", "q", "--top-k", "0"), "argument --top-k: takes a whole number from 1 to 1000"),
        (("search", "q", "--top-k", "-3"), "from 1 to 1000, got '-3'"),
        (("search", "q", "--top-k", "1001"), "from 1 to 1000, got '1001'"),
        (("search", "q", "--top-k", "2.5"), "from 1 to 1000, got '2.5'"),
        (("search", "q", "--top-k", "many"), "from 1 to 1000, got 'many'"),
        (("search", "q", "--min-score", "nan"), "argument --min-score: takes a number"),
        (("search", "q", "--min-score", "inf"), "got 'inf'"),
        (("search", "q", "--min-score=-inf"), "got '-inf'"),
        (("search", "q", "--min-score", "high"), "got 'high'"),
        (("delete", ""), "argument id: is empty: give a memory's full id"),
        (("delete", "x" * 300), "no memory id is longer than 256"),
        (("export", ""), "argument file: is empty"),
        (("import", ""), "argument file: is empty"),
    ],
)
def test_invalid_argument_values_are_usage_errors(db_path, capsys, args, message) -> None:
    code = _exit_status([*args, "--user", "alice", "--db", str(db_path)])
    assert code == 2
    _one_line_usage_error(capsys.readouterr().err, message)
    assert not db_path.exists()  # refused before any store was opened


@pytest.mark.parametrize(
    ("user", "message"),
    [
        (None, "--user is required"),
        ("", "--user is required"),
        ("  ", "--user: user_id must be a non-empty string"),
        ("u" * 3000, "--user: user_id is 3000 characters; the maximum is 2048"),
        # as the wrappers refuse it: a CRLF file's line, a terminal's escape sequence
        ("alice\r", "--user: user_id must not hold control characters, got 'alice\\r'"),
        ("bob\x1b]0;pwned\x07", "--user: user_id must not hold control characters"),
    ],
)
def test_a_missing_or_invalid_user_is_a_usage_error(db_path, capsys, monkeypatch, user, message):
    monkeypatch.delenv("HEADROOM_MEMORY_USER", raising=False)
    for argv in (["add", "Prefers tea"], ["list"], ["delete", "0" * 32]):
        user_args = ["--user", user] if user is not None else []
        assert _exit_status([*argv, *user_args, "--db", str(db_path)]) == 2
        _one_line_usage_error(capsys.readouterr().err, message)
    if user:
        monkeypatch.setenv("HEADROOM_MEMORY_USER", user)  # the same from the environment
        assert _exit_status(["add", "Prefers tea", "--db", str(db_path)]) == 2
        _one_line_usage_error(capsys.readouterr().err, message)
    assert not db_path.exists()


@pytest.mark.parametrize(
    ("db", "message"),
    [
        ("127.0.0.1:8123", "did you mean 'http://127.0.0.1:8123'"),
        ("", "--db is empty"),
        ("  ", "--db is empty"),
        ("http://", "is not a server URL (expected http://host:port)"),
        ("http://:8000", "is not a server URL (expected http://host:port)"),
        ("http://127.0.0.1:99999", "is not a server URL: Port out of range"),
        ("https://localhost:port", "is not a server URL: Port could not be cast"),
        ("http://[::1", "is not a server URL: Invalid IPv6 URL"),
        ("chroma://127.0.0.1:8000", "is a chroma:// URL"),
        ("ftp://example.com/memories", "is a ftp:// URL"),
    ],
)
def test_a_bad_db_is_a_usage_error(tmp_path, capsys, monkeypatch, db, message) -> None:
    monkeypatch.chdir(tmp_path)  # an empty --db would have opened (created) a store here
    monkeypatch.delenv("HEADROOM_MEMORY_DB", raising=False)
    for argv in (["add", "Prefers tea"], ["list"]):
        assert _exit_status([*argv, "--user", "a", "--db", db]) == 2
        _one_line_usage_error(capsys.readouterr().err, message)
    if db.strip():  # the same from the environment (where empty means unset: see below)
        monkeypatch.setenv("HEADROOM_MEMORY_DB", db)
        assert _exit_status(["add", "Prefers tea", "--user", "a"]) == 2
        message = message.replace("--db", "$HEADROOM_MEMORY_DB")
        _one_line_usage_error(capsys.readouterr().err, message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "db",
    [
        "http://admin:S3cr3t@chroma.internal:80o0",  # a port typo
        "https://admin:S3cr3t@/",  # no host
        "http://admin:S3cr3t@::1:8000",  # an IPv6 host without brackets
        "chroma://admin:S3cr3t@chroma.internal:8000",  # another scheme
    ],
)
def test_a_bad_server_url_is_shown_without_its_password(tmp_path, capsys, monkeypatch, db) -> None:
    """A URL refused for its port, host or scheme was printed whole, password included."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HEADROOM_MEMORY_DB", db)
    assert _exit_status(["list", "--user", "a"]) == 2
    assert _exit_status(["list", "--user", "a", "--db", db]) == 2
    err = capsys.readouterr().err
    assert "S3cr3t" not in err and "admin" not in err and err.count("://***@") == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "db", ["http:/admin:S3cr3t@chroma.internal:8000", "http//admin:S3cr3t@chroma.internal:8000"]
)
def test_a_mistyped_server_url_is_refused_without_its_password(
    tmp_path, capsys, monkeypatch, db
) -> None:
    """A URL with one slash was taken for a folder: "no memory store at http:/admin:S3cr3t@..."
    (or, for ``add``, a folder named so holding the memories)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HEADROOM_MEMORY_DB", db)
    assert _exit_status(["list", "--user", "a"]) == 2
    assert _exit_status(["add", "Prefers tea", "--user", "a", "--db", db]) == 2
    err = capsys.readouterr().err
    assert "S3cr3t" not in err and "admin" not in err
    assert err.count("did you mean 'http://***@chroma.internal:8000'?") == 2
    assert list(tmp_path.iterdir()) == []


def test_a_missing_store_is_named_without_a_password(tmp_path, capsys, monkeypatch) -> None:
    """A path that looks like a URL of no server ("ftp:/user:password@host") is a folder, and
    the error about its missing store showed the password."""
    monkeypatch.chdir(tmp_path)
    assert _exit_status(["list", "--user", "a", "--db", "ftp:/admin:S3cr3t@host"]) == 1
    err = capsys.readouterr().err
    assert "no memory store at ftp:/***@host" in err and "S3cr3t" not in err


@pytest.mark.parametrize("db", ["http://admin:s3cr#t@chroma.local:8000", "http://admin:pa/ss@h:1"])
def test_a_password_read_as_the_port_is_not_quoted(tmp_path, capsys, monkeypatch, db) -> None:
    """A password holding "#" or "/" ends the host there, and its start is read as the port:
    the parser's message quoted it ("Port could not be cast to integer value as 's3cr'")."""
    from headroom_memory_integrations import InvalidInputError
    from headroom_memory_integrations.engine import resolve_storage

    monkeypatch.chdir(tmp_path)
    assert _exit_status(["list", "--user", "a", "--db", db]) == 2
    err = capsys.readouterr().err
    assert "is not a server URL" in err and "s3cr" not in err and "pa" not in err.split("URL")[-1]
    with pytest.raises(InvalidInputError) as refused:
        resolve_storage(db)
    assert "s3cr" not in str(refused.value) and "pa/" not in str(refused.value)


def test_an_empty_db_variable_means_the_default_folder(tmp_path, monkeypatch) -> None:
    """As in the library (and a shell), ``HEADROOM_MEMORY_DB=`` is unset: memories go to
    ``~/.headroom-memory``, not to the current folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HEADROOM_MEMORY_DB", "")
    assert _exit_status(["add", "Prefers tea", "--user", "a"]) == 0
    assert (tmp_path / "home" / ".headroom-memory" / "chroma.sqlite3").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_delete_takes_a_full_id_or_a_unique_prefix_as_long_as_the_tables_show(
    run, tmp_path: Path
) -> None:
    _, out, _ = run("add", "Prefers tea", "--json")
    only = json.loads(out)["id"]

    def ids() -> list[str]:
        return [m["id"] for m in json.loads(run("list", "--json")[1])]

    for too_short in ("", only[:1], only[:11]):  # an unset shell variable, a slip of the finger
        code, out, err = run("delete", too_short)
        assert code == 2 and out == "" and "Traceback" not in err
        assert ("is empty" if not too_short else "is too short") in err.splitlines()[-1]
        assert ids() == [only]  # nothing deleted, though only one memory starts with it
    code, out, _ = run("delete", only[:12])  # the id a table shows
    assert code == 0 and out == f"deleted {only[:12]}\n" and ids() == []

    chosen = tmp_path / "chosen.jsonl"  # ids chosen by an application, kept by import
    chosen.write_text(
        "".join(
            json.dumps({"id": memory_id, "text": text}) + "\n"
            for memory_id, text in [
                ("project-note-1", "The launch is on Friday"),
                ("project-note-2", "Owns a red bicycle"),
                ("a", "Speaks Portuguese"),
            ]
        )
    )
    assert run("import", str(chosen))[0] == 0
    for ambiguous in ("project-note", "project-note-"):
        code, out, err = run("delete", ambiguous)
        assert code == 2 and out == ""
        line = err.splitlines()[-1]
        assert "is ambiguous: 2 memories start with it" in line
        assert "'project-note-1', 'project-note-2'" in line
    assert sorted(ids()) == ["a", "project-note-1", "project-note-2"]
    assert run("delete", "a")[0] == 0  # a full id, however short
    assert run("delete", "project-note-2")[0] == 0  # a full id, though a prefix of none
    assert ids() == ["project-note-1"]
    assert run("delete", "project-note")[0] == 0  # now unique
    assert ids() == []


def test_read_commands_on_a_missing_store_create_nothing(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "does" / "not" / "exist"
    for command in (["list"], ["search", "tea"], ["stats"], ["export"], ["delete", "abc"]):
        assert main([*command, "--user", "a", "--db", str(missing)]) == 1
        assert "no memory store at" in capsys.readouterr().err
    assert not (tmp_path / "does").exists()


def test_read_commands_create_no_default_store_nor_one_in_an_empty_folder(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HEADROOM_MEMORY_DB", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    for where in ([], ["--db", str(empty)]):
        for command in (["list"], ["search", "tea"], ["stats"], ["export"], ["delete", "abc"]):
            assert main([*command, "--user", "a", *where]) == 1
            assert "no memory store at" in capsys.readouterr().err
    assert not (tmp_path / "home").exists() and list(empty.iterdir()) == []
    assert main(["add", "Prefers tea", "--user", "a"]) == 0  # a write creates the default
    capsys.readouterr()
    assert main(["list", "--user", "a"]) == 0 and "Prefers tea" in capsys.readouterr().out


_CLI = [sys.executable, "-m", "headroom_memory_integrations.cli"]


def test_an_export_saved_with_a_byte_order_mark_is_imported(tmp_path: Path) -> None:
    """Windows editors and PowerShell 5 save UTF-8 with a byte order mark: its first line was
    refused ("Unexpected UTF-8 BOM"), from a file and from standard input."""
    source = MemoryStore("amy", db_path=tmp_path / "a")
    source.add_many(["Lives in Zürich", "Prefers tea"])
    saved = tmp_path / "notepad.jsonl"
    saved.write_bytes(b"\xef\xbb\xbf" + str(source.export()).encode("utf-8"))
    assert main(["import", "--user", "amy", "--db", str(tmp_path / "b"), str(saved)]) == 0
    assert {m.text for m in MemoryStore("amy", db_path=tmp_path / "b").get_all()} == {
        "Lives in Zürich",
        "Prefers tea",
    }
    piped = subprocess.run(
        [*_CLI, "import", "--user", "amy", "--db", str(tmp_path / "c"), "-"],
        input=saved.read_bytes(),
        capture_output=True,
        timeout=120,
    )
    assert piped.returncode == 0, piped.stderr
    assert len(MemoryStore("amy", db_path=tmp_path / "c").get_all()) == 2


def test_import_of_a_binary_or_huge_file_is_a_clear_error(run, tmp_path: Path) -> None:
    binary = tmp_path / "photo.jsonl"
    binary.write_bytes(bytes(range(256)) * 64)
    code, _, err = run("import", str(binary))
    assert code == 1 and "not a UTF-8 text file" in err and "Traceback" not in err
    huge = tmp_path / "huge.jsonl"
    huge.write_text("x" * 1_200_000 + "\n")
    code, _, err = run("import", str(huge))
    assert code == 1 and "line 1 is longer than" in err
    assert main(["import", str(tmp_path), "--user", "alice", "--db", str(tmp_path / "m")]) == 1


def test_import_of_a_bad_file_writes_nothing(run, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "good"}\n{"id": "b", "text": "x", "category": "hobby"}\n')
    run("add", "Already here")
    code, _, err = run("import", str(bad))
    assert code == 1 and "line 2" in err
    assert json.loads(run("stats", "--json")[1])["total_chunks"] == 1


def test_what_does_not_print_is_shown_escaped(run) -> None:
    """A memory is data: printed raw, a bidi override reversed the rest of its line on the
    terminal, and a newline in an added text printed a second line that read like an outcome."""
    code, out, _ = run("add", "Pays rent to \u202e4321-99 tnuocca\u202c monthly")
    assert code == 0 and "\u202e" not in out and "\\u202e4321-99 tnuocca\\u202c" in out
    code, out, _ = run("add", "Likes tea\nstored 0000 (fact): Is an admin")
    assert code == 0 and len(out.splitlines()) == 1
    code, out, _ = run("list")
    assert "\u202e" not in out and "\\u202e" in out and len(out.splitlines()) == 4


def test_stats_shows_a_user_id_that_does_not_print_escaped(run) -> None:
    """A user id is data, chosen by an app's user: printed raw, a bidi override in it reversed
    the rest of the ``stats`` line (a control character is refused as ``--user`` already)."""
    user = "bob\u202eevil\u200d"
    assert run("add", "Likes tea", user=user)[0] == 0
    code, out, _ = run("stats", user=user)
    assert code == 0 and "\u202e" not in out and "\u200d" not in out
    assert "bob\\u202eevil\\u200d" in out.splitlines()[0]


def test_installed_entry_point(db_path) -> None:
    exe = shutil.which("headroom-memory", path=str(Path(sys.executable).parent))
    assert exe, "the console script is installed with the package"
    common = ["--user", "dana", "--db", str(db_path)]
    added = subprocess.run(
        [exe, "add", "Speaks Portuguese", *common], capture_output=True, text=True, timeout=120
    )
    assert added.returncode == 0, added.stderr
    listed = subprocess.run(
        [exe, "list", "--json", *common], capture_output=True, text=True, timeout=120
    )
    assert [m["text"] for m in json.loads(listed.stdout)] == ["Speaks Portuguese"]
    failed = subprocess.run([exe, "add", " ", *common], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "empty" in failed.stderr and "Traceback" not in failed.stderr
    failed = subprocess.run(
        [exe, "delete", "", *common], capture_output=True, text=True, timeout=120
    )
    assert failed.returncode == 2 and "argument id: is empty" in failed.stderr
    listed = subprocess.run(
        [exe, "list", "--json", *common], capture_output=True, text=True, timeout=120
    )
    assert [m["text"] for m in json.loads(listed.stdout)] == ["Speaks Portuguese"]


def test_export_and_import_through_pipes_are_utf_8_whatever_the_locale(tmp_path: Path) -> None:
    """Files are UTF-8; standard input and output took the locale's encoding (Windows' cp1252
    in a pipe): an emoji failed ``export > file`` with a traceback, and ``import -`` stored
    "Zürich" as "ZÃ¼rich"."""
    said = "Lives in Zürich and likes café au lait 🎉"
    cli = [sys.executable, "-m", "headroom_memory_integrations.cli", "--user", "amy"]
    cp1252 = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    assert main(["add", "--user", "amy", "--db", str(tmp_path / "a"), said]) == 0
    exported = subprocess.run(
        [*cli[:3], "export", *cli[3:], "--db", str(tmp_path / "a")],
        capture_output=True,
        env=cp1252,
        timeout=120,
    )
    assert exported.returncode == 0 and b"Traceback" not in exported.stderr, exported.stderr
    assert json.loads(exported.stdout.decode("utf-8"))["text"] == said
    imported = subprocess.run(
        [*cli[:3], "import", *cli[3:], "--db", str(tmp_path / "b"), "-"],
        input=exported.stdout,
        capture_output=True,
        env=cp1252,
        timeout=120,
    )
    assert imported.returncode == 0, imported.stderr
    [memory] = MemoryStore("amy", db_path=tmp_path / "b").get_all()
    assert memory.text == said


def test_a_server_that_is_not_chroma_is_one_error_line_safe_for_a_terminal() -> None:
    """``--db`` on a wrong port (a web app): the server's whole reply was printed twice, a
    warning through Python's last-resort handler and the error, with its escape sequences."""
    import http.server
    import threading

    page = b"<html>\n<h1>Not Found</h1>\n\x1b]0;pwned\x07\x1b[2Jmore\n</html>\n"

    class NotChroma(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotChroma)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        failed = subprocess.run(
            [sys.executable, "-m", "headroom_memory_integrations.cli", "list", "--db", url],
            env={**os.environ, "HEADROOM_MEMORY_USER": "a"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.shutdown()
        server.server_close()
    lines = failed.stderr.splitlines()
    assert failed.returncode == 1 and lines[-1].startswith("headroom-memory: error: ")
    assert len(lines) <= 2 and "\x1b" not in failed.stderr and "Traceback" not in failed.stderr


def test_ctrl_d_at_the_clear_question_cancels(tmp_path: Path, capsys) -> None:
    """At a terminal, ``clear`` asks first; Ctrl-D (end of input) is a no, not a traceback."""
    import os
    import pty
    import subprocess
    import sys

    db = tmp_path / "db"
    assert main(["add", "--user", "alice", "--db", str(db), "Plays the cello"]) == 0
    leader, follower = pty.openpty()
    child = subprocess.Popen(
        [sys.executable, "-m", "headroom_memory_integrations.cli", "clear", "--user", "alice"],
        stdin=follower,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "HEADROOM_MEMORY_DB": str(db)},
    )
    os.close(follower)
    os.write(leader, b"\x04")  # Ctrl-D
    out, err = child.communicate(timeout=120)
    os.close(leader)
    assert child.returncode == 1 and b"cancelled" in err and b"Traceback" not in err
    assert b"Forget every memory" in err and out == b""  # asked on stderr: stdout is the result
    capsys.readouterr()
    assert main(["list", "--user", "alice", "--db", str(db), "--json"]) == 0
    assert [m["text"] for m in json.loads(capsys.readouterr().out)] == ["Plays the cello"]


@pytest.mark.parametrize("command", [["list"], ["list", "--json"], ["export"]])
def test_a_reader_that_leaves_early_stops_the_output_quietly(tmp_path: Path, command) -> None:
    """``headroom-memory list | head``: the pipe closes before the output is written; the
    command stops with the shell's status for that (141), no traceback and no error line."""
    db = tmp_path / "db"
    assert main(["add", "--user", "alice", "--db", str(db), "Plays the cello"]) == 0
    child = subprocess.Popen(
        [sys.executable, "-m", "headroom_memory_integrations.cli", *command, "--user", "alice"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "HEADROOM_MEMORY_DB": str(db)},
    )
    assert child.stdout is not None
    child.stdout.close()  # the reader is gone before anything was written
    err = child.stderr.read() if child.stderr else b""
    assert child.wait(timeout=120) == 141, err
    assert err == b""


def test_ctrl_c_ends_a_command_with_a_line_and_status_130(run, monkeypatch) -> None:
    """Ctrl-C used to print Python's traceback; a shell tool says one line and exits 130."""
    assert run("add", "Prefers tea")[0] == 0

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(MemoryStore, "get_all", interrupted)
    status, out, err = run("list")
    assert status == 130
    assert err == "headroom-memory: interrupted\n" and "Traceback" not in out + err


@pytest.mark.parametrize("db", ["http://127.0.0.1:9/chroma?tenant=x", "http://127.0.0.1:9#a"])
def test_a_server_url_with_a_query_is_a_usage_error(tmp_path, capsys, monkeypatch, db) -> None:
    """The query and fragment of a ``--db`` URL were dropped without a word."""
    monkeypatch.chdir(tmp_path)
    assert _exit_status(["list", "--user", "a", "--db", db]) == 2
    assert "has a query or a fragment" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
