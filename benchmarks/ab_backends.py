"""Per-request injection (``flow.before``, a new question each time) at 10k memories, the
model in float32 and in 8-bit integers alternated on the same store, in one process:
``python -m benchmarks.ab_backends`` (~1 min with the vector cache; see docs/benchmarks.md,
"The model in 8-bit integers")."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from headroom_memory_integrations import ChromaStorage, LocalEmbedder, MemoryStore
from headroom_memory_integrations.embeddings.local import cpu_threads
from headroom_memory_integrations.flow import MemoryFlow
from headroom_memory_integrations.openai.flow import CompletionsFlow

from .common import RESULTS, Context
from .injection import _NoJobs
from .population import embedded_user
from .scripted import ask

SIZE = 10_000
ROUNDS = 300
FORMS = {"float32": "onnx", "8-bit": "onnx-int8"}


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="headroom-ab-"))
    embedded_user(folder, "user", SIZE, RESULTS / "cache")
    storage = ChromaStorage.at(folder)
    ctx = Context(quick=False, workdir=folder)
    flows = {
        form: CompletionsFlow(
            MemoryFlow(
                MemoryStore("user", storage=storage, embedder=LocalEmbedder(backend=backend)),  # type: ignore[arg-type]
                _NoJobs(),
                inline=True,
                top_k=5,
            )
        )
        for form, backend in FORMS.items()
    }
    for question in ctx.queries.take(30):  # warm up: models loaded, read-ahead done
        for flow in flows.values():
            flow.before(ask(question))
    times: dict[str, list[float]] = {form: [] for form in flows}
    for index in range(ROUNDS):
        order = list(flows.items())
        if index % 2:
            order.reverse()
        for (form, flow), question in zip(order, ctx.queries.take(len(order))):
            start = time.perf_counter()
            flow.before(ask(question))
            times[form].append((time.perf_counter() - start) * 1000)
    for form, values in times.items():
        values.sort()
        p95 = values[int(len(values) * 0.95)]
        print(f"{form}: p50 {statistics.median(values):.2f} ms, p95 {p95:.2f} ms, n={len(values)}")
    print(f"load average {[round(x, 2) for x in os.getloadavg()]}, model threads {cpu_threads()}")


if __name__ == "__main__":
    main()
