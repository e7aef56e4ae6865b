"""Write the 8-bit layer matrices of a model folder, so that the default embedder loads faster.

The default embedder (``LocalEmbedder()``, ``backend="onnx-int8"``) runs the six matrix products
of each transformer layer in 8-bit integers. Quantizing those 36 matrices from the float16 ones
in ``model.safetensors`` takes ~50 ms of numpy, under the GIL, on every first load, which is on
the path of the first answer (beside the import of Chroma on another thread, where it took
~250 ms). This script does it once and writes the result beside the weights, in
``model.int8.safetensors``: for each matrix, the int8 ``(in, out)`` matrix and one float32
scale per output column, made by the very function the encoder falls back to
(``bert_onnx.int8_layer_matrices``), so the vectors are the same bit for bit. The encoder maps
the file and hands the tensors to ONNX Runtime as they are.

    python scripts/quantize_model.py            # the bundled all-MiniLM-L6-v2
    python scripts/quantize_model.py DIR        # another model folder
    python scripts/quantize_model.py --check    # exit 1 unless the file is what it would write

Run it again whenever ``model.safetensors`` changes (``scripts/build_local_model.py``);
tests/test_embeddings.py fails while the shipped file is stale.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the package from this checkout

from headroom_memory_integrations.embeddings.bert import (  # noqa: E402
    float32_weights,
    read_safetensors,
)
from headroom_memory_integrations.embeddings.bert_onnx import (  # noqa: E402
    INT8_FILE,
    int8_layer_matrices,
)
from headroom_memory_integrations.embeddings.local import bundled_model_dir  # noqa: E402


def quantize(model_dir: Path, into: Path) -> None:
    """Write ``into`` from ``model_dir``'s ``config.json`` and ``model.safetensors``."""
    from safetensors.numpy import save_file

    source = model_dir / "model.safetensors"
    layers = int(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])
    weights = float32_weights(read_safetensors(source), keep_float16=True)
    weights = {name.removeprefix("bert."): array for name, array in weights.items()}
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    # one entry: safetensors writes the metadata in no fixed order
    metadata = {"source": f"scripts/quantize_model.py from model.safetensors, sha256 {digest}"}
    save_file(int8_layer_matrices(weights, layers), str(into), metadata=metadata)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path, default=bundled_model_dir())
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args(argv)

    target = args.model_dir / INT8_FILE
    with tempfile.TemporaryDirectory() as scratch:
        built = Path(scratch) / INT8_FILE
        quantize(args.model_dir, built)
        if args.check:
            current = target.is_file() and target.read_bytes() == built.read_bytes()
            print("up to date" if current else f"differs: {target}")
            return 0 if current else 1
        target.write_bytes(built.read_bytes())
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
