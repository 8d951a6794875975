"""torchvision's ResNet family (ResNet, WideResNet, ResNeXt) as a Flax linen module (NHWC,
eval-mode BatchNorm).

Submodules are named after torchvision's state-dict keys, so a key maps mechanically onto the
Flax tree: ``layer1.0.downsample.1.running_var`` -> ``batch_stats/layer1/0/downsample/1/var``,
``layer1.0.conv1.weight`` -> ``params/layer1/0/conv1/kernel`` (OIHW -> HWIO), ``fc.weight`` ->
``params/fc/kernel`` (transposed). Padding follows torchvision exactly (explicit symmetric pads;
the max pool pads with -inf), and the bottleneck puts its stride on the 3x3 conv.

Every module's ``__call__`` takes ``train_batch_norm`` (default False, eval mode). True runs
BatchNorm as torch does in train mode: each layer normalises with its batch statistics and
updates its running statistics once (``mutable=["batch_stats"]``); ``probe_batch_stats`` uses it
for the reference's one-off probe (the README's "The BatchNorm probe").
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from patchcore_jax.sharding import HIGHEST

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_STAGES: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4", "logits")


def normalize_imagenet(images: jax.Array) -> jax.Array:
    """Pixels -> ImageNet-normalised floats, in torchvision's order (ToTensor, then Normalize).

    images: [B, H, W, 3] uint8 or float RGB in 0..255. Returns [B, H, W, 3] float32.
    """
    scaled = images.astype(jnp.float32) / 255.0
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (scaled - mean) / std


def torch_conv(features: int, kernel: int, stride: int, name: str, groups: int = 1) -> nn.Conv:
    """torchvision conv without bias: padding kernel // 2 on every side; ``groups`` input and
    output channel groups (torch's ``groups``, Flax's ``feature_group_count``)."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        precision=HIGHEST,
        name=name,
    )


class BatchNorm(nn.Module):
    """torch ``BatchNorm2d`` (eps 1e-5, momentum 0.1) with Flax's variable names.

    Eval mode (the default) is Flax's ``nn.BatchNorm(use_running_average=True)`` arithmetic:
    ``(x - mean) * (rsqrt(var + eps) * scale) + bias``. Train mode normalises with the batch's
    mean and biased variance (two-pass) and, when ``batch_stats`` is mutable, updates the running
    statistics as torch does: ``0.9 * running + 0.1 * batch``, with the UNBIASED batch variance
    (Flax's own BatchNorm uses the biased one, so it cannot reproduce torch's update).
    """

    epsilon: float = 1e-5
    momentum: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        features = x.shape[-1]
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            count = x.size // features
            if count < 2:
                raise ValueError(
                    f"train-mode BatchNorm {self.name} needs more than one value per channel, "
                    f"got input {x.shape} (the probe image is too small for this stage)"
                )
            mean = jnp.mean(x, axes)
            var = jnp.mean(jnp.square(x - mean), axes)
            if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
                keep = 1.0 - self.momentum
                running_mean.value = keep * running_mean.value + self.momentum * mean
                unbiased = var * (count / (count - 1))
                running_var.value = keep * running_var.value + self.momentum * unbiased
        else:
            mean, var = running_mean.value, running_var.value
        return (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias


def _batch_norm(name: str) -> BatchNorm:
    """torchvision's BatchNorm2d (epsilon 1e-5)."""
    return BatchNorm(name=name)


class Downsample(nn.Module):
    """torchvision's ``downsample`` Sequential: 1x1 strided conv ``0`` then BatchNorm ``1``."""

    features: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, train_batch_norm: bool = False) -> jax.Array:
        x = torch_conv(self.features, 1, self.stride, name="0")(x)
        return _batch_norm(name="1")(x, train_batch_norm)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); ``planes`` output channels."""

    expansion: ClassVar[int] = 1

    planes: int
    stride: int = 1
    width_per_group: int = 64
    groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train_batch_norm: bool = False) -> jax.Array:
        if self.width_per_group != 64 or self.groups != 1:
            raise ValueError(
                "BasicBlock only supports width_per_group=64 and groups=1 (as torchvision)"
            )
        train = train_batch_norm
        out = torch_conv(self.planes, 3, self.stride, "conv1")(x)
        out = nn.relu(_batch_norm("bn1")(out, train))
        out = _batch_norm("bn2")(torch_conv(self.planes, 3, 1, "conv2")(out), train)
        identity = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            identity = Downsample(self.planes, self.stride, name="downsample")(x, train)
        return nn.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, ``groups`` channel groups) -> 1x1 bottleneck; ``4 * planes`` output
    channels. The inner width is torchvision's ``int(planes * width_per_group / 64) * groups``:
    ResNeXt-101 32x8d is ``groups=32, width_per_group=8``, wide ResNets ``width_per_group=128``.
    """

    expansion: ClassVar[int] = 4

    planes: int
    stride: int = 1
    width_per_group: int = 64
    groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train_batch_norm: bool = False) -> jax.Array:
        width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
        out_features = self.planes * self.expansion
        train = train_batch_norm
        out = nn.relu(_batch_norm("bn1")(torch_conv(width, 1, 1, "conv1")(x), train))
        conv2 = torch_conv(width, 3, self.stride, "conv2", self.groups)
        out = nn.relu(_batch_norm("bn2")(conv2(out), train))
        out = _batch_norm("bn3")(torch_conv(out_features, 1, 1, "conv3")(out), train)
        identity = x
        if self.stride != 1 or x.shape[-1] != out_features:
            identity = Downsample(out_features, self.stride, name="downsample")(x, train)
        return nn.relu(out + identity)


class ResNetStage(nn.Module):
    """One ``layerN``: blocks named ``0``, ``1``, ...; the first one carries the stride."""

    block: type[nn.Module]
    num_blocks: int
    planes: int
    stride: int
    width_per_group: int
    groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train_batch_norm: bool = False) -> jax.Array:
        for index in range(self.num_blocks):
            stride = self.stride if index == 0 else 1
            block = self.block(
                self.planes, stride, self.width_per_group, self.groups, name=str(index)
            )
            x = block(x, train_batch_norm)
        return x


class TorchvisionInput:
    """The pixel side of a torchvision-layout backbone (ResNet family, DenseNet): ``__call__``
    normalises 0..255 RGB as ImageNet did and runs the module's ``forward_normalized`` (which
    the BatchNorm probe calls directly on its already-normalised input)."""

    def __call__(self, images: jax.Array, train_batch_norm: bool = False) -> dict[str, jax.Array]:
        """images: [B, H, W, 3] uint8/float RGB 0..255 -> {stage: [B, h, w, C] float32}."""
        return self.forward_normalized(self.normalize_input(images), train_batch_norm)

    def normalize_input(self, images: jax.Array) -> jax.Array:
        """Pixels 0..255 -> the float32 input of ``forward_normalized`` (ImageNet-normalised)."""
        return normalize_imagenet(images)


class ResNet(TorchvisionInput, nn.Module):
    """torchvision ``ResNet(block, layers, groups=..., width_per_group=...)``, NHWC.

    ResNeXt is the same network with ``groups`` > 1 (grouped 3x3 convolutions).
    Returns an ordered dict (network order) of the stages named in ``layers`` (any of
    ``layer1``..``layer4``, ``logits``); nothing after the deepest requested stage is computed
    (its parameters are not even created by ``init``).

    Example (the tiny test fixture): ``ResNet(Bottleneck, (1, 2, 1, 1), width_per_group=16,
    num_classes=10, layers=("layer1", "logits"))``.
    """

    block: type[nn.Module]
    stage_sizes: Sequence[int]
    width_per_group: int = 64
    num_classes: int = 1000
    layers: tuple[str, ...] = ("layer2", "layer3")
    groups: int = 1

    @nn.compact
    def forward_normalized(
        self, x: jax.Array, train_batch_norm: bool = False
    ) -> dict[str, jax.Array]:
        """x: [B, H, W, 3] float32, already ImageNet-normalised -> {stage: [B, h, w, C]}."""
        if len(self.stage_sizes) != 4:
            raise ValueError(f"ResNet needs 4 stage sizes, got {tuple(self.stage_sizes)}")
        unknown = [name for name in self.layers if name not in RESNET_STAGES]
        if unknown or not self.layers:
            raise ValueError(
                f"ResNet layers must be a non-empty subset of {RESNET_STAGES}, "
                f"got {tuple(self.layers)}"
            )
        deepest = max(RESNET_STAGES.index(name) for name in self.layers)
        outputs: dict[str, jax.Array] = collections.OrderedDict()

        x = nn.relu(_batch_norm("bn1")(torch_conv(64, 7, 2, "conv1")(x), train_batch_norm))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        stages = zip(self.stage_sizes, (64, 128, 256, 512), (1, 2, 2, 2), strict=True)
        for index, (num_blocks, planes, stride) in enumerate(stages):
            name = RESNET_STAGES[index]
            x = ResNetStage(
                self.block, num_blocks, planes, stride, self.width_per_group, self.groups, name=name
            )(x, train_batch_norm)
            if name in self.layers:
                outputs[name] = x
            if index == deepest:
                return outputs
        pooled = jnp.mean(x, axis=(1, 2))
        outputs["logits"] = nn.Dense(self.num_classes, precision=HIGHEST, name="fc")(pooled)
        return outputs


# name -> (block, stage sizes, width_per_group, groups); torchvision's definitions.
RESNET_ARCHITECTURES: dict[str, tuple[type[nn.Module], tuple[int, ...], int, int]] = {
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 128, 1),
    "resnet18": (BasicBlock, (2, 2, 2, 2), 64, 1),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 64, 1),
    "wide_resnet101_2": (Bottleneck, (3, 4, 23, 3), 128, 1),
    "resnext101_32x8d": (Bottleneck, (3, 4, 23, 3), 8, 32),
}


def resnet(name: str, layers: Sequence[str] = ("layer2", "layer3")) -> ResNet:
    """The torchvision architecture ``name`` (ImageNet head, 1000 classes)."""
    if name not in RESNET_ARCHITECTURES:
        raise ValueError(f"unknown ResNet {name!r}; available: {tuple(RESNET_ARCHITECTURES)}")
    block, stage_sizes, width_per_group, groups = RESNET_ARCHITECTURES[name]
    return ResNet(block, stage_sizes, width_per_group, 1000, tuple(layers), groups)


def probe_batch_stats(module: nn.Module, variables: dict, image_shape: tuple[int, int]) -> dict:
    """The reference's BatchNorm probe (README), as a pure function of ``variables``.

    The authors' ``PatchCore.load`` runs the backbone once, in torch's train mode, on
    ``ones([1, 3, H, W])`` in the already-normalised input space, stopping after the last
    extracted stage. Every BatchNorm it passes normalises that input with its own statistics and
    moves its running statistics once towards them; later passes run in eval mode with the moved
    statistics. The published numbers were made that way.

    Args:
      module: a torchvision-layout backbone (ResNet, DenseNet) with a
        ``forward_normalized(x, train_batch_norm)`` method; its ``layers`` decide where the probe
        stops.
      variables: {'params', 'batch_stats'}; may hold more layers than ``module`` uses.
      image_shape: (H, W) of the model's input images.
    Returns:
      ``variables`` with the running statistics of every BatchNorm up to the deepest requested
      stage updated; all other entries (later layers included) unchanged.
    """
    ones = jnp.ones((1, *image_shape, 3), jnp.float32)
    _, updates = module.apply(
        variables, ones, True, method="forward_normalized", mutable=["batch_stats"]
    )
    return {**variables, "batch_stats": updates["batch_stats"]}
