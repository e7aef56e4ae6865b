"""Secrets taken out of text that is shown or kept: API keys, bearer tokens and a URL's
user-info, in error messages, log lines and the job queue's ``last_error``."""

from __future__ import annotations

import logging
import re
import traceback
from contextlib import suppress

_URL_START = re.compile(r"://|^\s*[A-Za-z][A-Za-z0-9+.-]*(?::[/\\]*|[/\\]{2,})")
"""What comes before the user-info and host of a whole URL (see :func:`without_credentials`):
"://", or at its start the scheme of a URL typed wrong ("http:/", "http:\\\\", "http//",
"user:" of "user:password@host")."""

_URL_IN_TEXT_START = r"://|(?<![A-Za-z0-9+.-])(?i:https?)(?::[/\\]*|[/\\]{2,})"
"""What comes before a URL's user-info and host in free text (a log line, an error): "://",
or a server URL typed wrong ("http:/", "http:", "http:\\\\", "http//", as
``engine._MISTYPED_URL`` reads it). Only http and https are read typed wrong: any other
"word:" is ordinary text ("to:alice@example.com", "C:\\Users\\bob@corp")."""

_SECRETS = (
    # an API key: OpenAI's and Anthropic's (sk-...), Groq's, xAI's, Hugging Face's, Google's
    (re.compile(r"\b(sk-|gsk_|xai-)[A-Za-z0-9_-]{8,}"), r"\1***"),
    (re.compile(r"\b(hf_|AIza)[A-Za-z0-9_-]{20,}"), r"\1***"),
    (re.compile(r"\b(Bearer\s+)[^\s'\",;]+", re.IGNORECASE), r"\1***"),
    # a URL's "user:password@", in a server URL typed wrong too (see without_user_info; in
    # free text a URL ends at a space)
    (
        re.compile(rf"({_URL_IN_TEXT_START})(\S+)"),
        lambda url: url.group(1) + without_user_info(url.group(2)),
    ),
    # api_key=..., "password": "...", ?key=... (a gateway quoting the request)
    (
        re.compile(
            r"(\b(?:api[-_]?key|access[-_]?token|token|password|secret)['\"]?\s*[:=]\s*['\"]?"
            r"|[?&]key=)[^\s'\",;&}]+",
            re.IGNORECASE,
        ),
        r"\1***",
    ),
)


def without_user_info(authority: str) -> str:
    """``authority``, what follows a URL's scheme ("user:password@host:8000/x"), with what
    comes before its last "@" written ``***@``. A password may hold "@", ":", "/", "?" or "#"
    (typed without percent-encoding), so the mask runs to the last "@": more is hidden, never
    less. An "@" in the path or the query ("host:8000/a@b") hides the host too."""
    _, at, rest = authority.rpartition("@")
    return f"***@{rest}" if at else authority


def without_credentials(url: str) -> str:
    """``url`` as an error message may show it: what comes before the host ("user:password@",
    up to its last "@", which a password may hold) written ``***@`` (:func:`without_user_info`).
    A URL this package refuses for its port, its host or its scheme, or one typed wrong
    ("http:/user:password@host", "ftp:user:password@host"), may still carry a real password.
    ``url`` is a whole URL: its scheme, typed wrong, is read at its start alone (a folder's
    "./backups:2024/mem@v2" is shown as it is). The log filter and the job queue
    (:func:`without_secrets`) mask each URL of a text the same way after "://", and an http or
    https URL typed wrong."""
    start = _URL_START.search(url)
    return url if start is None else url[: start.end()] + without_user_info(url[start.end() :])


def without_secrets(text: str) -> str:
    """``text`` with API keys, bearer tokens and a URL's user-info written ``***``, so a
    provider or gateway that echoes the key it was sent ("Incorrect API key provided:
    sk-...") does not put it on disk or in a log. The rest (an exception's type, a status
    code, an error code) stays."""
    for secret, mask in _SECRETS:
        text = secret.sub(mask, text)
    return text


class _WithoutSecrets(logging.Filter):
    """Takes secrets out of a log record (:func:`without_secrets`): its message, and the
    traceback it carries, whose last line is the exception's message ("openai.
    AuthenticationError: ... Incorrect API key provided: sk-..."). A record that holds none is
    left as it is. One that does gets its message written out, and its traceback as text
    (``exc_text``, which a ``logging.Formatter`` prints in place of formatting the exception)
    without the exception itself, so that no handler formats that again."""

    def filter(self, record: logging.LogRecord) -> bool:
        with suppress(Exception):  # never fail the log call (a message whose str() raises
            self._redact(record)  # is the handler's to report, as without the filter)
        return True

    @staticmethod
    def _redact(record: logging.LogRecord) -> None:
        message = record.getMessage()
        masked = without_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            said = "".join(_messages_of(record.exc_info[1]))
            if without_secrets(said) != said:  # what an exception says, not its source lines
                formatted = logging.Formatter().formatException(record.exc_info)
                record.exc_text, record.exc_info = without_secrets(formatted), None
        elif record.exc_text:
            record.exc_text = without_secrets(record.exc_text)


def _messages_of(error: BaseException) -> list[str]:
    """What ``error`` and the exceptions it was raised from or during say (their
    ``format_exception_only`` lines, notes included): a traceback's source lines
    (``headers={"Authorization": f"Bearer {token}"}``) hold no secret's value."""
    said: list[str] = []
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        said += traceback.format_exception_only(type(current), current)
        pending += [current.__cause__, current.__context__]
        pending += list(getattr(current, "exceptions", ()))  # an exception group's
    return said


_FILTER = _WithoutSecrets()


def logger_without_secrets(name: str) -> logging.Logger:
    """The logger ``name`` (``logging.getLogger``), with secrets taken out of every record it
    logs: the package's modules log through these, so that an exception whose message holds
    an API key (a gateway echoing the key it was sent) does not put it in the log, at any
    level."""
    named = logging.getLogger(name)
    if _FILTER not in named.filters:
        named.addFilter(_FILTER)
    return named
