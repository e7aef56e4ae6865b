"""Check which torch this environment holds, so that `make` never leaves a CUDA build behind.

    python scripts/check_torch.py absent  # exit 1 if torch, triton or a CUDA package is installed
    python scripts/check_torch.py cpu     # exit 1 unless torch is installed, a CPU-only build

PyPI's torch for Linux is the CUDA build: it pulls nvidia-* packages (~2.7 GB) and triton.
The default install and `make test` need no torch at all; where torch is wanted (the
``sentence-transformers`` extra, ``make test-torch``), it is installed first from torch's CPU
index, and this check confirms that nothing replaced it.
"""

from __future__ import annotations

import sys
from importlib.metadata import distributions


def installed_names() -> set[str]:
    return {(dist.metadata["Name"] or "").lower() for dist in distributions()}


def cuda_packages(names: set[str]) -> list[str]:
    return sorted(n for n in names if n.startswith("nvidia-") or n in {"triton", "pytorch-triton"})


def main(argv: list[str]) -> int:
    if argv not in (["absent"], ["cpu"]):
        print("usage: python scripts/check_torch.py absent|cpu", file=sys.stderr)
        return 2
    names = installed_names()
    cuda = cuda_packages(names)
    if argv == ["absent"]:
        found = sorted(n for n in names if n in {"torch", "sentence-transformers"}) + cuda
        if found:
            print(
                f"{sys.prefix} holds {', '.join(found)}, which the default install does not "
                "need (an environment made by an older Makefile?): `make clean`, then retry",
                file=sys.stderr,
            )
            return 1
        return 0
    import torch

    if cuda or torch.version.cuda is not None:
        print(
            f"{sys.prefix} holds torch's CUDA build ({torch.__version__}; "
            f"{', '.join(cuda) or 'no nvidia packages'}): `make clean`, then retry",
            file=sys.stderr,
        )
        return 1
    print(f"torch {torch.__version__}, CPU only")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
