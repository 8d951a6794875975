"""Paths of the test fixtures and data, and their one loader (importable without pytest).

Everything the tests need ships in the repository, so the suite runs in a fresh clone:
``tests/fixtures/`` holds the golden outputs of the authors' code and of torchvision (copied
from the project's shared folder), and ``data/mvtec_ad_demo/bottle`` a real demo category. The
complete MVTec AD bottle category in ``../shared`` (``$PATCHCORE_SHARED``) is used instead of
the demo where it exists; tests that need it (or other shared files) are marked ``shared_data``
and are skipped only where it is absent. CI has it.

Used by tests/conftest.py and by benchmarks/gpu_check.py, which runs where pytest may be absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PATCHCORE_SHARED", REPO_ROOT.parent / "shared")).resolve()
FIXTURES = REPO_ROOT / "tests" / "fixtures"
FULL_BOTTLE = SHARED / "data" / "mvtec_ad" / "bottle"
DEMO_BOTTLE = REPO_ROOT / "data" / "mvtec_ad_demo" / "bottle"
HAVE_SHARED = FULL_BOTTLE.is_dir()
# The complete category where it is available, else the demo subset (same file names).
BOTTLE = FULL_BOTTLE if HAVE_SHARED else DEMO_BOTTLE
WEIGHTS = REPO_ROOT / "weights"  # the bundled MobileNetV2 TFLite


def load_fixture(name: str, group: str | None = None) -> dict[str, np.ndarray]:
    """Arrays of ``fixtures/<name>.npz``; with ``group``, only ``group/*`` keys, prefix removed.

    float16 arrays (stored exactly) come back as float32 (float32 values stored exactly).
    """
    path = FIXTURES / f"{name}.npz"
    if not path.exists():
        raise FileNotFoundError(f"fixture {path} is missing from the repository")
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
