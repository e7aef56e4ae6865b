"""The ``headroom-memory`` command: look after users' memories from a shell.

::

    headroom-memory add --user alice "Prefers Python for backend work" --category preference
    # -> stored 3f2a... (preference): ...; "duplicate of ..." or "superseded ... (was: ...)"
    headroom-memory search --user alice "which language?" --json
    headroom-memory list --user alice
    headroom-memory export --user alice alice.jsonl

Every command takes ``--user`` (or ``$HEADROOM_MEMORY_USER``), ``--db`` (a folder or a Chroma
server URL; default ``$HEADROOM_MEMORY_DB`` or ``~/.headroom-memory``) and ``--json``.
Exit status: 0 on success, 1 when the memory layer refuses or fails, 2 on bad usage (a
missing or invalid argument, checked before any store is opened, or an id too short or
ambiguous for ``delete``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from .engine import (
    DEFAULT_DB_PATH,
    MAX_MEMORY_ID_CHARS,
    MAX_TOP_K,
    MemoryStore,
    check_user_id,
    clean_metadata,
    clean_text,
    server_url,
)
from .errors import HeadroomMemoryError, InvalidInputError, MemoryNotFoundError
from .keys import clean_keys
from .redaction import without_credentials
from .storage.folder import DATABASE_FILE
from .types import Category, Memory, in_utc
from .write_path import Outcome, Remembered

_TEXT_WIDTH = 60
_HOST_PORT = re.compile(r"[\w.-]+:\d{1,5}")
_SHORT_ID = 12
"""How many characters of an id the tables show: ``delete`` takes a prefix this long."""
_BROKEN_PIPE = 141
"""The exit status when the reader of the output leaves (``| head``): 128 + SIGPIPE, as a shell
shows for a tool that signal stopped."""


class _UsageError(Exception):
    """Bad usage found after parsing (exit status 2, as for argparse's own errors)."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--user",
        default=os.environ.get("HEADROOM_MEMORY_USER"),
        help="whose memories (default: $HEADROOM_MEMORY_USER)",
    )
    common.add_argument(
        "--db",
        default=None,
        help="storage folder or Chroma server URL (default: $HEADROOM_MEMORY_DB "
        "or ~/.headroom-memory)",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    categories = [c.value for c in Category]

    parser = argparse.ArgumentParser(
        prog="headroom-memory", description="Manage per-user long-term memories."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add = commands.add_parser("add", parents=[common], help="remember a text")
    add.add_argument("text", type=_checked(lambda text: clean_text(text, "the memory text")))
    add.add_argument("--category", choices=categories, default="fact")
    add.add_argument(
        "--meta",
        action="append",
        default=[],
        type=_meta_pair,
        metavar="KEY=VALUE",
        help="metadata (repeatable)",
    )
    add.add_argument(
        "--keys",
        metavar="WORDS",
        type=_checked(clean_keys),
        help='topic words (and a question) to index with it, e.g. "diet, seafood"',
    )

    search = commands.add_parser("search", parents=[common], help="find relevant memories")
    search.add_argument("query", type=_checked(lambda query: clean_text(query, "the query")))
    search.add_argument(
        "--top-k",
        type=_top_k,
        default=5,
        metavar="N",
        help=f"at most N results, 1 to {MAX_TOP_K} (default 5)",
    )
    search.add_argument(
        "--category", action="append", choices=categories, help="only this category (repeatable)"
    )
    search.add_argument(
        "--min-score",
        type=_score,
        default=None,
        metavar="SCORE",
        help="relevance floor (-1 shows every candidate with its score; write a negative "
        "exponent with '=': --min-score=-1e-3)",
    )

    listing = commands.add_parser("list", parents=[common], help="list memories, oldest first")
    listing.add_argument("--category", choices=categories)

    delete = commands.add_parser("delete", parents=[common], help="forget one memory")
    delete.add_argument(
        "id",
        type=_memory_id,
        help=f"the full id, or its first {_SHORT_ID} characters as a table shows them",
    )

    clear = commands.add_parser(
        "clear",
        parents=[common],
        help="forget all of a user's memories, and their turns queued for extraction",
    )
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    commands.add_parser("stats", parents=[common], help="counts and configuration")

    export = commands.add_parser("export", parents=[common], help="write memories as JSON Lines")
    export.add_argument(
        "file",
        nargs="?",
        default="-",
        type=_file_name,
        help="a file, or - for stdout (default)",
    )

    load = commands.add_parser("import", parents=[common], help="read memories from JSON Lines")
    load.add_argument("file", type=_file_name, help="a file written by export, or - for stdin")
    load.add_argument(
        "--as-is",
        action="store_true",
        help="write each memory as it is, by its id, merging none (a backup, a move)",
    )
    return parser


def _table(memories: Sequence[Memory], scores: Sequence[float] | None = None) -> str:
    if not memories:
        return "(no memories)"
    rows = [
        ([f"{scores[i]:.3f}"] if scores is not None else [])
        + [
            _visible(m.id[:12]),
            m.category.value,
            in_utc(m.updated_at).strftime("%Y-%m-%d %H:%M"),
            _shorten(m.text),
        ]
        for i, m in enumerate(memories)
    ]
    header = (["score"] if scores is not None else []) + ["id", "category", "noted (UTC)", "text"]
    widths = [max(len(r[col]) for r in [header, *rows]) for col in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
        for row in [header, ["-" * w for w in widths], *rows]
    ]
    return "\n".join(lines)


def _shorten(text: str) -> str:
    flat = _visible(text)
    return flat if len(flat) <= _TEXT_WIDTH else flat[: _TEXT_WIDTH - 1] + "…"


def _visible(text: str) -> str:
    """``text`` on one line, safe to print on a terminal: runs of whitespace become one space,
    and any other character that does not print (an escape sequence's ESC, a bidi override, a
    zero-width joiner) is shown as ``\\uXXXX``. A memory, its id (an import file chooses it) or
    its history is data: it must not move the cursor, retitle the window, reverse the line or
    start a line of its own that reads like the tool's output."""
    flat = " ".join(text.split())
    return "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in flat)


def _checked(check: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse ``type``: the argument as given, once ``check`` (one of the library's own
    validators) accepts it; its refusal is a usage error, with the library's message."""

    def checked(value: str) -> str:
        try:
            check(value)
        except InvalidInputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    return checked


def _top_k(value: str) -> int:
    try:
        top_k = int(value)
    except ValueError:
        top_k = 0
    if not 1 <= top_k <= MAX_TOP_K:
        raise argparse.ArgumentTypeError(
            f"takes a whole number from 1 to {MAX_TOP_K}, got {value!r}"
        )
    return top_k


def _score(value: str) -> float:
    try:
        score = float(value)
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        raise argparse.ArgumentTypeError(f"takes a number such as 0.1 or -1, got {value!r}")
    return score


def _memory_id(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError(
            f"is empty: give a memory's full id, or its first {_SHORT_ID} characters"
        )
    if len(value) > MAX_MEMORY_ID_CHARS:
        raise argparse.ArgumentTypeError(
            f"is {len(value)} characters; no memory id is longer than {MAX_MEMORY_ID_CHARS}"
        )
    return value


def _file_name(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("is empty: give a file name, or - for stdin/stdout")
    return value


def _meta_pair(pair: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE, got {pair!r}")
    try:
        clean_metadata({key: value})
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return key, value


def _metadata(pairs: Sequence[tuple[str, str]]) -> dict[str, str] | None:
    return dict(pairs) if pairs else None


_READS = ("search", "list", "stats", "export", "delete", "clear")
"""Commands that only read or remove: they never create a store."""


def _check_usage(args: argparse.Namespace) -> None:
    """Raise :class:`_UsageError` for what argparse cannot check one argument at a time:
    ``--user`` (which may come from the environment), the number of ``--meta`` pairs, and
    ``--db``."""
    if not args.user:
        raise _UsageError("--user is required (or set HEADROOM_MEMORY_USER)")
    try:
        check_user_id(args.user)
    except InvalidInputError as exc:
        raise _UsageError(f"--user: {exc}") from None
    if args.command == "add":
        try:
            clean_metadata(_metadata(args.meta))
        except InvalidInputError as exc:
            raise _UsageError(f"--meta: {exc}") from None
    _check_db(args)


def _check_db(args: argparse.Namespace) -> None:
    """Raise :class:`_UsageError` for a ``--db`` that is empty or blank (Chroma would open the
    current folder; an empty ``$HEADROOM_MEMORY_DB`` means the default), a malformed server
    URL, or neither a folder nor a URL (``host:port`` without ``http://``). A read command on a
    folder that does not exist raises :class:`HeadroomMemoryError` instead of creating one."""
    given = args.db is not None
    # an empty variable is an unset one, as in a shell (and in the library): the default folder
    db = args.db if given else (os.environ.get("HEADROOM_MEMORY_DB", "").strip() or None)
    where = "--db" if given else "$HEADROOM_MEMORY_DB"
    if db is None:
        _check_store_exists(args, DEFAULT_DB_PATH, "the default; name another with --db")
        return
    if not db.strip():
        raise _UsageError(f"{where} is empty: name a folder or a Chroma server URL")
    try:
        url = server_url(db, where)
    except InvalidInputError as exc:
        raise _UsageError(str(exc)) from None
    if url:
        shown = without_credentials(db)
        try:
            parts = urlsplit(url)
            host, _ = parts.hostname, parts.port  # a bad port raises ValueError
        except ValueError as exc:  # (its text may quote a password holding "#" or "/" as the
            # port: said only of a URL with no "@")
            why = f": {exc}" if "@" not in db else " (its port or host cannot be read)"
            raise _UsageError(f"{where} {shown!r} is not a server URL{why}") from None
        if not host:
            raise _UsageError(f"{where} {shown!r} is not a server URL (expected http://host:port)")
        if "@" not in db and ("?" in db or "#" in db):
            raise _UsageError(
                f"{where} {shown!r} has a query or a fragment, which Chroma's client cannot"
                " send (a path, such as /chroma, is kept)"
            )
        return
    if _HOST_PORT.fullmatch(db):
        raise _UsageError(
            f"{where} {db!r} is neither a folder nor a URL: did you mean 'http://{db}'?"
        )
    _check_store_exists(args, db, f"check {where}")


def _check_store_exists(args: argparse.Namespace, folder: str, hint: str) -> None:
    """A read command never creates a store: raise :class:`HeadroomMemoryError` where
    ``folder`` holds none (it is missing, or holds no Chroma database). A password in a path
    that looks like a URL ("ftp:/user:password@host") is not shown."""
    if args.command in _READS and not (Path(folder).expanduser() / DATABASE_FILE).is_file():
        shown = without_credentials(str(folder))
        raise HeadroomMemoryError(f"no memory store at {shown} ({hint}); nothing was created")


def _run(args: argparse.Namespace, out: TextIO) -> Any:
    """Carry out one command; return what to print as JSON (text output is written here)."""
    store = MemoryStore(args.user, db_path=args.db)
    if args.command == "add":
        done = store.remember(
            args.text, category=args.category, metadata=_metadata(args.meta), keys=args.keys
        )
        if not args.json:
            print(_outcome_line(done), file=out)
        return {"outcome": done.outcome.value, **done.memory.to_dict()}
    if args.command == "search":
        results = store.search(
            args.query, top_k=args.top_k, categories=args.category, min_score=args.min_score
        )
        if not args.json:
            print(_table([m for m, _ in results], [s for _, s in results]), file=out)
        return [{"score": round(s, 6), **m.to_dict()} for m, s in results]
    if args.command == "list":
        memories = store.get_all(args.category)
        if not args.json:
            print(_table(memories), file=out)
        return [m.to_dict() for m in memories]
    if args.command == "delete":
        memory_id = _full_id(store, args.id)
        try:
            store.delete(memory_id)
        except MemoryNotFoundError:  # its message names the user by a hash, as the logs do
            raise HeadroomMemoryError(
                f"user {args.user!r} has no memory with id {args.id!r}"
            ) from None
        if not args.json:
            print(f"deleted {args.id}", file=out)
        return {"deleted": memory_id}  # the whole id, for a script given a prefix
    if args.command == "clear":
        if not args.yes:
            if not sys.stdin.isatty():
                raise HeadroomMemoryError("refusing to clear without --yes (no terminal to ask)")
            # asked on stderr: stdout may be a file or a pipe (clear --json > out.json)
            print(f"Forget every memory of user {args.user!r}? [y/N] ", end="", file=sys.stderr)
            sys.stderr.flush()
            try:
                answer = input()
            except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the question
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                raise HeadroomMemoryError("cancelled")
        removed = store.forget_user()  # the user's queued turns too, not only the memories
        if not args.json:
            print(f"cleared {_memories(removed)} of user {args.user!r}", file=out)
        return {"cleared": removed}
    if args.command == "stats":
        stats = store.stats()
        if not args.json:
            for key, value in stats.items():  # the user id is data too ("bob\u202e...")
                print(f"{key:<22}{_visible(str(value))}", file=out)
        return stats
    if args.command == "export":
        if args.file == "-":
            count = store.export(out)
        else:
            count = store.export(args.file)
            assert isinstance(count, int)  # the number written, for a file
            if not args.json:
                print(f"exported {_memories(count)} to {args.file}", file=out)
        return {"exported": count}
    if args.command == "import":
        imported = store.import_with_outcomes(
            sys.stdin if args.file == "-" else args.file, consolidate=not args.as_is
        )
        counts = Counter(each.outcome for each in imported)
        if not args.json:
            print(f"imported {_memories(len(imported))}{_import_summary(counts)}", file=out)
        return {"imported": len(imported), **{str(o): counts[o] for o in Outcome}}
    raise AssertionError(args.command)  # argparse only lets known commands through


def _memories(count: int) -> str:
    """``1 memory``, ``2 memories``."""
    return f"{count} memory" if count == 1 else f"{count} memories"


def _import_summary(counts: Counter[Outcome]) -> str:
    """``: 3 stored, 1 updated a stored memory, 2 already known`` (the parts that occurred)."""
    parts = [
        f"{counts[Outcome.STORED]} stored" if counts[Outcome.STORED] else "",
        f"{counts[Outcome.SUPERSEDED]} updated a stored memory"
        if counts[Outcome.SUPERSEDED]
        else "",
        f"{counts[Outcome.DUPLICATE]} already known" if counts[Outcome.DUPLICATE] else "",
    ]
    said = ", ".join(part for part in parts if part)
    return f": {said}" if said else ""


def _outcome_line(done: Remembered) -> str:
    """``stored <id> ...``, ``duplicate of <id> ...`` or ``superseded <id> ... (was: ...)``."""
    memory = done.memory
    about = f"{_visible(memory.id)} ({memory.category.value}): {_visible(memory.text)}"
    if done.outcome is Outcome.DUPLICATE:
        return f"duplicate of {about} (nothing stored)"
    if done.outcome is Outcome.SUPERSEDED:
        return f"superseded {about} (was: {_visible(memory.history[-1].text)})"
    return f"stored {about}"


def _full_id(store: MemoryStore, given: str) -> str:
    """The id of the memory ``given`` names: a memory's full id, or a prefix at least as long
    as the ids the tables show (:data:`_SHORT_ID` characters) that only one memory of the user
    starts with. A shorter prefix, or one several memories share, is a usage error; an id that
    names no memory is returned as given, for :meth:`MemoryStore.delete` to refuse."""
    if store.get_many([given]):
        return given
    if len(given) < _SHORT_ID:
        raise _UsageError(
            f"id {given!r} is too short: give a memory's full id, or its first {_SHORT_ID} "
            "characters as a table shows them"
        )
    matches = [m.id for m in store.get_all() if m.id.startswith(given)]
    if len(matches) > 1:
        shown = ", ".join(repr(memory_id) for memory_id in matches[:3])
        more = ", ..." if len(matches) > 3 else ""
        raise _UsageError(
            f"id {given!r} is ambiguous: {len(matches)} memories start with it ({shown}{more});"
            " give more of the id"
        )
    return matches[0] if matches else given


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``headroom-memory``; returns the exit status."""
    args = _parser().parse_args(argv)  # exits with status 2 on a bad argument
    _in_utf8()
    _warnings_on_one_line()
    try:
        return _main(args)
    except BrokenPipeError:  # the reader left (``| head``): stop quietly, as a shell tool would
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit cannot fail again
        os.close(devnull)
        return _BROKEN_PIPE
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback (an import stays all-or-nothing)
        print("headroom-memory: interrupted", file=sys.stderr)
        return _INTERRUPTED


_INTERRUPTED = 130
"""The exit status after Ctrl-C, as a shell gives a command that SIGINT stopped (128 + 2)."""

_MESSAGE_CHARS = 500
"""The longest error or warning the command prints (a server's reply can be a whole page)."""


def _one_line(message: str) -> str:
    """``message`` as the command prints it: its first line (a server's reply quoted in it is
    data), safe for a terminal (:func:`_visible`), at most :data:`_MESSAGE_CHARS` long."""
    lines = message.strip().splitlines() or [""]
    first = _visible(lines[0])
    if len(first) > _MESSAGE_CHARS:
        first = first[: _MESSAGE_CHARS - 3] + "..."
    return first + (" (...)" if len(lines) > 1 else "")


class _OneLineWarnings(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        print(f"headroom-memory: warning: {_one_line(record.getMessage())}", file=sys.stderr)


def _warnings_on_one_line() -> None:
    """The library's warnings as one line each (without a traceback), as the errors are;
    Python's last-resort handler printed them whole, a server's reply included."""
    package = logging.getLogger("headroom_memory_integrations")
    if not package.handlers and not logging.getLogger().handlers:
        package.addHandler(_OneLineWarnings(logging.WARNING))


def _in_utf8() -> None:
    """Standard input and output in UTF-8, as the files export and import write and read:
    with a locale's encoding (Windows' cp1252 in a pipe), an emoji in a memory failed the
    export and an import read "Zürich" as "ZÃ¼rich"."""
    for stream in (sys.stdin, sys.stdout):
        reconfigure = getattr(stream, "reconfigure", None)
        if callable(reconfigure) and (getattr(stream, "encoding", "") or "").lower() != "utf-8":
            with contextlib.suppress(ValueError, OSError):
                reconfigure(encoding="utf-8")


def _main(args: argparse.Namespace) -> int:
    quiet_json = args.json and args.command == "export" and args.file == "-"
    try:
        _check_usage(args)
        result = _run(args, sys.stdout)
    except _UsageError as exc:
        print(f"headroom-memory: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise
    except (HeadroomMemoryError, OSError) as exc:
        print(f"headroom-memory: error: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    if args.json and not quiet_json:
        json.dump(result, sys.stdout, ensure_ascii=False, indent=2, default=str)
        print()
    if args.command == "stats" and "error" in result:  # some figures could not be read
        print(f"headroom-memory: error: {result['error']}", file=sys.stderr)
        return 1
    sys.stdout.flush()  # a closed pipe shows here, not at exit
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
