"""Write a learned array beside the bundled model, or check that the shipped one is it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_or_check(
    target: Path, learned: np.ndarray, dtype: type, tolerance: float, check: bool
) -> int:
    """With ``check``, 0 if the shipped ``target`` is within ``tolerance`` of ``learned`` (1
    otherwise); else save ``learned`` as ``dtype`` there. Prints what it did."""
    if check:
        difference = float(np.abs(np.load(target).astype(np.float64) - learned).max())
        print(f"largest difference from {target.name}: {difference:.2e}")
        return 0 if difference <= tolerance else 1
    np.save(target, learned.astype(dtype))
    print(f"wrote {target}")
    return 0
