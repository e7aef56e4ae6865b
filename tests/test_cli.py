"""The `headroom-memory` command: tables for people, --json for scripts, clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from headroom_memory_integrations.cli import main


@pytest.fixture
def run(db_path, capsys):
    def invoke(*args: str, user: str = "alice") -> tuple[int, str, str]:
        code = main([*args, "--user", user, "--db", str(db_path)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


def test_add_search_list_stats_as_tables(run) -> None:
    code, out, _ = run("add", "Prefers Python for backend work", "--category", "preference")
    assert code == 0 and out.startswith("stored ") and "(preference)" in out
    run("add", "Works at a fintech startup", "--meta", "source=onboarding")
    code, out, _ = run("search", "Which language should I use?")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["score", "id", "category", "created", "(UTC)", "text"]
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
    assert code == 0 and "deleted" in out
    assert len(json.loads(run("list", "--json")[1])) == 1
    code, _, err = run("clear")  # no terminal to confirm on: refused
    assert code == 1 and "--yes" in err
    code, out, _ = run("clear", "--yes")
    assert code == 0 and "cleared 1" in out
    code, out, _ = run("import", str(export), user="bob")
    assert code == 0 and "imported 2" in out
    _, out, _ = run("export", user="bob")  # to stdout
    assert {json.loads(line)["user_id"] for line in out.splitlines()} == {"bob"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("add", ""), "memory text is empty"),
        (("add", "x" * 3000), "maximum is 2000"),
        (("add", "ok", "--keys", "x" * 200), "the maximum is 120"),
        (("delete", "no-such-id"), "no memory with id"),
        (("search", "q", "--top-k", "0"), "top_k"),
        (("import", "/no/such/file.jsonl"), "No such file"),
    ],
)
def test_errors_exit_1_with_a_message(run, args, message) -> None:
    assert run("add", "Has a store already")[0] == 0
    code, _, err = run(*args)
    assert code == 1 and message in err and err.startswith("headroom-memory: error:")


def test_usage_errors_exit_2(db_path, capsys) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["add", "x", "--category", "hobby", "--user", "a", "--db", str(db_path)])
    assert raised.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert main(["list", "--db", str(db_path)]) == 2  # no --user
    with pytest.raises(SystemExit) as raised:
        main(["add", "ok", "--meta", "novalue", "--user", "a", "--db", str(db_path)])
    assert raised.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err
    assert main(["list", "--user", "a", "--db", "127.0.0.1:8123"]) == 2
    assert "did you mean 'http://127.0.0.1:8123'" in capsys.readouterr().err
    assert not Path("127.0.0.1:8123").exists() and not db_path.exists()


def test_read_commands_on_a_missing_store_create_nothing(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "does" / "not" / "exist"
    for command in (["list"], ["search", "tea"], ["stats"], ["export"], ["delete", "abc"]):
        assert main([*command, "--user", "a", "--db", str(missing)]) == 1
        assert "no memory store at" in capsys.readouterr().err
    assert not (tmp_path / "does").exists()


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
    assert failed.returncode == 1 and "empty" in failed.stderr
