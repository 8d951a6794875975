"""Writes a backbone's random-init weights as a converted weights folder, for benchmarks that
run the CLI of two trees on a backbone whose ImageNet weights are not on the machine.

``fit --random-init-missing`` records its weights as ``random-init``, which older trees cannot
load; a converted file (``<name>.msgpack`` + ``<name>.json``, ``backbones.convert``'s format)
loads in every tree through ``PATCHCORE_WEIGHTS``. The stages ``init_backbone`` builds keep its
weights (seed 0); the rest of the network (e.g. layer4, fc) is initialised by Flax (key 0).

    python benchmarks/random_weights.py wide_resnet50_2 --out /tmp/weights
    PATCHCORE_WEIGHTS=/tmp/weights patchcore-jax fit DATA --backbone wide_resnet50_2 --out MODEL
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax.backbones import init_backbone
from patchcore_jax.backbones.convert import full_module, save_converted


def _overwrite(full: dict, part: dict) -> None:
    for key, value in part.items():
        if isinstance(value, dict):
            _overwrite(full[key], value)
        else:
            full[key] = np.asarray(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone", help="a ResNet-family name, e.g. wide_resnet50_2")
    parser.add_argument("--out", required=True, type=Path, help="weights folder to write")
    args = parser.parse_args()
    module = full_module(args.backbone)
    variables = module.init(jax.random.PRNGKey(0), jnp.ones((1, 64, 64, 3)))
    variables = jax.tree.map(np.asarray, dict(variables))
    _overwrite(variables, jax.tree.map(np.asarray, dict(init_backbone(args.backbone).variables)))
    source = "random-init (benchmarks/random_weights.py)"
    print(save_converted(variables, args.backbone, args.out, source, "0" * 64))


if __name__ == "__main__":
    main()
