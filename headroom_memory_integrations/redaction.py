"""Secrets taken out of text that is shown or kept: API keys, bearer tokens and a URL's
user-info, in error messages, log lines and the job queue's ``last_error``."""

from __future__ import annotations

import re

_SECRETS = (
    # an API key: OpenAI's and Anthropic's (sk-...), Groq's, xAI's, Hugging Face's, Google's
    (re.compile(r"\b(sk-|gsk_|xai-)[A-Za-z0-9_-]{8,}"), r"\1***"),
    (re.compile(r"\b(hf_|AIza)[A-Za-z0-9_-]{20,}"), r"\1***"),
    (re.compile(r"\b(Bearer\s+)[^\s'\",;]+", re.IGNORECASE), r"\1***"),
    # a URL's "user:password@" (see without_user_info; in free text a URL ends at a space)
    (re.compile(r"(?<=://)\S+"), lambda url: without_user_info(url.group())),
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


def without_secrets(text: str) -> str:
    """``text`` with API keys, bearer tokens and a URL's user-info written ``***``, so a
    provider or gateway that echoes the key it was sent ("Incorrect API key provided:
    sk-...") does not put it on disk or in a log. The rest (an exception's type, a status
    code, an error code) stays."""
    for secret, mask in _SECRETS:
        text = secret.sub(mask, text)
    return text
