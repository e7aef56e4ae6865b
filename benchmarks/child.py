"""One cold-start measurement in a fresh interpreter (run by ``common.run_child``).

Usage: ``python benchmarks/child.py MODE '{"json": "arguments"}'``; prints one JSON line.
Only the standard library is imported before the clock starts, so the times include every
import the measured step needs.

Modes:
    import:   ``import headroom_memory_integrations``.
    search:   import, open an existing store (``db``, ``user``), first ``search(query)``.
    steps:    the same, with the store opened, then the model loaded, then the search.
    wrapped:  import, ``with_fast_memory`` around an ``openai.OpenAI`` pointed at ``base_url``
              (a scripted server in the parent process), first ``chat.completions.create``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MiB.

    Linux keeps, across ``exec``, the peak RSS of the process image that was replaced, so
    ``ru_maxrss`` of a freshly spawned interpreter includes its parent's RSS at fork (the
    benchmark process, with the model loaded). ``VmHWM`` is the peak of this image only.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(mode: str, args: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()

    def ms() -> float:
        return (time.perf_counter() - start) * 1000

    import headroom_memory_integrations as hmi

    imported = ms()
    result: dict[str, Any] = {"import_ms": imported, "package": hmi.__file__}
    if mode == "search":
        store = hmi.MemoryStore(args["user"], db_path=args["db"])
        found = store.search(args["query"])
        result["first_search_ms"] = ms() - imported
        result["results"] = len(found)
    elif mode == "steps":  # the first search, one step at a time
        store = hmi.MemoryStore(args["user"], db_path=args["db"])
        result["store_created_ms"] = ms()
        store.count()
        result["collection_opened_ms"] = ms()
        hmi.LocalEmbedder().warm_up()
        result["model_loaded_ms"] = ms()
        store.search(args["query"])
        result["searched_ms"] = ms()
    elif mode == "wrapped":
        from openai import OpenAI

        from headroom_memory_integrations.openai import with_fast_memory

        result["openai_imported_ms"] = ms()
        client = with_fast_memory(
            OpenAI(base_url=args["base_url"], api_key="benchmark", max_retries=0),
            args["user"],
            db_path=args["db"],
        )
        result["wrapped_ms"] = ms()
        answer = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": args["query"]}]
        )
        result["first_answer_ms"] = ms()
        result["answer_chars"] = len(answer.choices[0].message.content or "")
    elif mode != "import":
        raise SystemExit(f"unknown mode {mode!r}")
    result["total_ms"] = ms()
    result["peak_rss_mb"] = peak_rss_mb()
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], json.loads(sys.argv[2]))))
