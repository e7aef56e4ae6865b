"""Whose memories a run reaches: the one check :class:`~.middleware.MemoryMiddleware` and the
memory tools (:mod:`.tools`) share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import InvalidInputError
from ..wiring import check_user_id

USER_ID_KEY = "user_id"
"""Where a run names its user: ``context.user_id`` (or ``context["user_id"]``), or
``config["configurable"]["user_id"]``; a run naming two different users there is refused."""


def run_user(
    config: Mapping[str, Any] | None,
    context: Any,
    serves: str | None,
    who: str,
    instead: str = "build it without user_id (and memory) to serve the user each run names",
) -> str | None:
    """The user a run is for: ``serves`` (the one user of a middleware or tool built for one
    user), else the user the run names in its context or its config (None if it names none).
    ``who`` names the caller in the error messages (``"this MemoryMiddleware"``), and
    ``instead`` says what to do for a run of another user.

    Raises:
        InvalidInputError: the run names two different users (its context and its config); or
            a user other than ``serves``; or a user id that is not a valid string.
    """
    from_context = _get(context, USER_ID_KEY)
    configured = _get((config or {}).get("configurable"), USER_ID_KEY)
    if from_context is not None and configured is not None and from_context != configured:
        # serving either one could put one user's memories in the other's run
        raise InvalidInputError(
            "the run names two users: its context's user_id and "
            "config['configurable']['user_id'] differ; name the user in one of them"
        )
    user = from_context if from_context is not None else configured
    if serves is not None:
        if user is not None and str(user) != serves:  # 42 and UUID(...) name "42" and str(...)
            # serving it would show the one user's memories in the other's run, and store the
            # other's facts as the one user's
            raise InvalidInputError(
                f"{who} serves user {serves!r} only, and the run names another user: {instead}"
            )
        return serves
    if user is None:
        return None
    if not isinstance(user, str):
        raise InvalidInputError(f"user_id must be a string, got {type(user).__name__}")
    return check_user_id(user)


def check_call_user(
    config: Mapping[str, Any] | None, serves: str | None, who: str, instead: str
) -> None:
    """Refuse a call of a one-user object (``who``, serving ``serves``) whose ``config``, or
    the config of the chain or graph step it runs in, names another user (see
    :func:`run_user`)."""
    from langchain_core.runnables import ensure_config

    merged = ensure_config(config)  # type: ignore[arg-type]
    runtime = (merged.get("configurable") or {}).get("__pregel_runtime")  # LangGraph's
    run_user(merged, getattr(runtime, "context", None), serves, who, instead)


def _get(source: Any, key: str) -> Any:
    if source is None:
        return None
    if isinstance(source, Mapping):
        return source.get(key)
    return getattr(source, key, None)
