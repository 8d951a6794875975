"""patchcore-jax: PatchCore anomaly detection in JAX/Flax.

Public API::

    from patchcore_jax import PatchCore, PatchCoreConfig, load, save

The device stages are importable on their own for use in other JAX programs:
``patchcore_jax.features``, ``patchcore_jax.coreset``, ``patchcore_jax.scoring``,
``patchcore_jax.sharding`` and ``patchcore_jax.backbones``.
"""

from patchcore_jax.checkpoint import CheckpointError, load, save
from patchcore_jax.config import PatchCoreConfig
from patchcore_jax.model import PatchCore, embed_images
from patchcore_jax.version import package_version

__version__ = package_version()

__all__ = [
    "CheckpointError",
    "PatchCore",
    "PatchCoreConfig",
    "__version__",
    "embed_images",
    "load",
    "save",
]
