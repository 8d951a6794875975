"""torchvision's DenseNet (timm's ``densenet201`` has the same layout) as a Flax linen module.

Submodules are named after torchvision's state-dict keys, as in ``resnet.py``:
``features.denseblock2.denselayer3.norm1.running_var`` ->
``batch_stats/features/denseblock2/denselayer3/norm1/var``, ``classifier.weight`` ->
``params/classifier/kernel``. A dense layer is norm1-relu-conv1 (1x1, ``bn_size * growth``
channels) then norm2-relu-conv2 (3x3, ``growth`` channels), its output concatenated to its input;
a transition is norm-relu-conv (1x1, half the channels) then a 2x2 average pool.

Stages are named as the authors name them (``features.denseblockN`` hooks): ``denseblockN`` is
the block's output, all its concatenated features, before the next transition (denseblock1..4 at
stride 4, 8, 16, 32); ``logits`` the classifier after norm5, ReLU and global average pooling.
BatchNorm is ``resnet.BatchNorm``, so ``train_batch_norm=True`` runs the reference's probe.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from patchcore_jax.backbones.resnet import BatchNorm, TorchvisionInput, torch_conv
from patchcore_jax.sharding import HIGHEST

DENSENET_STAGES: tuple[str, ...] = (
    "denseblock1",
    "denseblock2",
    "denseblock3",
    "denseblock4",
    "logits",
)
DENSENET_DEFAULT_LAYERS: tuple[str, ...] = ("denseblock2", "denseblock3")


class DenseLayer(nn.Module):
    """torchvision's ``_DenseLayer``: x [B, h, w, C] -> its ``growth_rate`` new channels."""

    growth_rate: int
    bn_size: int

    @nn.compact
    def __call__(self, x: jax.Array, train_batch_norm: bool = False) -> jax.Array:
        out = nn.relu(BatchNorm(name="norm1")(x, train_batch_norm))
        out = torch_conv(self.bn_size * self.growth_rate, 1, 1, "conv1")(out)
        out = nn.relu(BatchNorm(name="norm2")(out, train_batch_norm))
        return torch_conv(self.growth_rate, 3, 1, "conv2")(out)


class DenseBlock(nn.Module):
    """``denselayer1``..``denselayerN``: [B, h, w, C] -> [B, h, w, C + N * growth_rate]."""

    num_layers: int
    growth_rate: int
    bn_size: int

    @nn.compact
    def __call__(self, x: jax.Array, train_batch_norm: bool = False) -> jax.Array:
        for index in range(self.num_layers):
            layer = DenseLayer(self.growth_rate, self.bn_size, name=f"denselayer{index + 1}")
            x = jnp.concatenate([x, layer(x, train_batch_norm)], axis=-1)
        return x


class Transition(nn.Module):
    """norm-relu-conv 1x1 (``features`` channels), 2x2 average pool: half the grid."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train_batch_norm: bool = False) -> jax.Array:
        x = nn.relu(BatchNorm(name="norm")(x, train_batch_norm))
        x = torch_conv(self.features, 1, 1, "conv")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseFeatures(nn.Module):
    """torchvision's ``features`` Sequential, stopped after the deepest requested stage.

    Returns {stage: [B, h, w, C]} for the requested ``denseblockN`` and, when ``with_norm5``,
    ``norm5``: denseblock4 after the last BatchNorm (the classifier's input).
    """

    growth_rate: int
    block_config: Sequence[int]
    num_init_features: int
    bn_size: int
    layers: tuple[str, ...]
    with_norm5: bool

    @nn.compact
    def __call__(self, x: jax.Array, train_batch_norm: bool = False) -> dict[str, jax.Array]:
        train = train_batch_norm
        x = torch_conv(self.num_init_features, 7, 2, "conv0")(x)
        x = nn.relu(BatchNorm(name="norm0")(x, train))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        last = len(self.block_config) if self.with_norm5 else self._deepest_block()
        outputs: dict[str, jax.Array] = collections.OrderedDict()
        for index, num_layers in enumerate(self.block_config[:last]):
            name = f"denseblock{index + 1}"
            x = DenseBlock(num_layers, self.growth_rate, self.bn_size, name=name)(x, train)
            if name in self.layers:
                outputs[name] = x
            if index + 1 < last:
                x = Transition(x.shape[-1] // 2, name=f"transition{index + 1}")(x, train)
        if self.with_norm5:
            outputs["norm5"] = BatchNorm(name="norm5")(x, train)
        return outputs

    def _deepest_block(self) -> int:
        return max(int(name.removeprefix("denseblock")) for name in self.layers)


class DenseNet(TorchvisionInput, nn.Module):
    """torchvision ``DenseNet(growth_rate, block_config, num_init_features, bn_size,
    num_classes)``, NHWC; returns an ordered dict of the stages in ``layers`` (any of
    ``DENSENET_STAGES``), computing (and creating parameters for) nothing after the deepest.

    Example (the reduced test fixture): ``DenseNet(8, (2, 3, 2, 2), 16, 2, 10,
    layers=DENSENET_STAGES)``.
    """

    growth_rate: int = 32
    block_config: Sequence[int] = (6, 12, 48, 32)
    num_init_features: int = 64
    bn_size: int = 4
    num_classes: int = 1000
    layers: tuple[str, ...] = DENSENET_DEFAULT_LAYERS

    @nn.compact
    def forward_normalized(
        self, x: jax.Array, train_batch_norm: bool = False
    ) -> dict[str, jax.Array]:
        """x: [B, H, W, 3] float32, already ImageNet-normalised -> {stage: [B, h, w, C]}."""
        if len(self.block_config) != 4:
            raise ValueError(f"DenseNet needs 4 block sizes, got {tuple(self.block_config)}")
        unknown = [name for name in self.layers if name not in DENSENET_STAGES]
        if unknown or not self.layers:
            raise ValueError(
                f"DenseNet layers must be a non-empty subset of {DENSENET_STAGES}, "
                f"got {tuple(self.layers)}"
            )
        with_logits = "logits" in self.layers
        outputs = DenseFeatures(
            self.growth_rate,
            tuple(self.block_config),
            self.num_init_features,
            self.bn_size,
            tuple(name for name in self.layers if name != "logits"),
            with_logits,
            name="features",
        )(x, train_batch_norm)
        if with_logits:
            pooled = jnp.mean(nn.relu(outputs.pop("norm5")), axis=(1, 2))
            classifier = nn.Dense(self.num_classes, precision=HIGHEST, name="classifier")
            outputs["logits"] = classifier(pooled)
        return outputs


# name -> (growth_rate, block_config, num_init_features, bn_size); torchvision's definitions.
DENSENET_ARCHITECTURES: dict[str, tuple[int, tuple[int, ...], int, int]] = {
    "densenet201": (32, (6, 12, 48, 32), 64, 4),
}


def densenet(name: str, layers: Sequence[str] = DENSENET_DEFAULT_LAYERS) -> DenseNet:
    """The torchvision architecture ``name`` (ImageNet head, 1000 classes)."""
    if name not in DENSENET_ARCHITECTURES:
        raise ValueError(f"unknown DenseNet {name!r}; available: {tuple(DENSENET_ARCHITECTURES)}")
    growth_rate, block_config, num_init_features, bn_size = DENSENET_ARCHITECTURES[name]
    return DenseNet(growth_rate, block_config, num_init_features, bn_size, 1000, tuple(layers))
