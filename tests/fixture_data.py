"""Paths of the shared fixtures and data, and their one loader (importable without pytest).

Used by tests/conftest.py and by benchmarks/gpu_check.py, which runs where pytest may be absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PATCHCORE_SHARED", REPO_ROOT.parent / "shared")).resolve()
FIXTURES = SHARED / "fixtures"
BOTTLE = SHARED / "data" / "mvtec_ad" / "bottle"
WEIGHTS = REPO_ROOT / "weights"


def load_fixture(name: str, group: str | None = None) -> dict[str, np.ndarray]:
    """Arrays of ``fixtures/<name>.npz``; with ``group``, only ``group/*`` keys, prefix removed.

    float16 arrays (stored exactly) come back as float32, as SPEC section 7 prescribes.
    """
    path = FIXTURES / f"{name}.npz"
    if not path.exists():
        raise FileNotFoundError(f"fixture {path} is missing; set PATCHCORE_SHARED to ../shared")
    with np.load(path) as data:
        out = {}
        for key in data.files:
            if group is not None and not key.startswith(group + "/"):
                continue
            value = data[key]
            if value.dtype == np.float16:
                value = value.astype(np.float32)
            out[key if group is None else key[len(group) + 1 :]] = value
    return out
