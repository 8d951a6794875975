"""Shared test set-up: 8 virtual CPU devices, and one loader for ../shared fixtures and data."""

from __future__ import annotations

import os

# Every test process sees 8 CPU devices so sharded stages are exercised; single-device
# behaviour is tested with explicit one-device meshes. Must happen before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

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


@pytest.fixture(scope="session")
def bottle_dir() -> Path:
    if not BOTTLE.is_dir():
        raise FileNotFoundError(f"MVTec bottle data not found at {BOTTLE}")
    return BOTTLE
