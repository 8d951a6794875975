"""MobileNetV2 as a Flax linen module whose every layer is described by plain data.

The layout (convolution sizes, strides, padding, fused activations, input quantisation) is read
from a TFLite file by ``tflite.read_tflite`` so the float model computes what the file's
operators compute, with batch norm already folded into each convolution's bias. ``DEFAULT_LAYOUT``
is the standard MobileNetV2 1.0 (TF "SAME" padding, ReLU6, 1001 classes) for random-init use.

Stages: ``strideS`` is the output of the last inverted-residual block whose output has stride S
(at 224 px: stride4 56x56x24, stride8 28x28x32, stride16 14x14x96, stride32 7x7x320), and
``logits`` the 1001-way classifier output before the softmax.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from patchcore_jax.sharding import HIGHEST

MOBILENET_STAGES: tuple[str, ...] = ("stride4", "stride8", "stride16", "stride32", "logits")
ACTIVATIONS = ("none", "relu", "relu6")

# Padding: "SAME" (TensorFlow's rule: the extra pixel goes after), "VALID", or explicit
# ((top, bottom), (left, right)) from a PAD operator followed by a VALID convolution.
Padding = str | tuple[tuple[int, int], tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One convolution (bias included) followed by its fused activation."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Padding = "SAME"
    activation: str = "relu6"
    depthwise: bool = False


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Inverted residual: optional 1x1 expansion, depthwise conv, linear 1x1 projection."""

    expand: ConvSpec | None
    depthwise: ConvSpec
    project: ConvSpec
    residual: bool


@dataclasses.dataclass(frozen=True)
class MobileNetV2Layout:
    """Everything that fixes the computation except the weights.

    Input pixels q (0..255) become ``input_scale * (q - input_zero_point)``, exactly the
    TFLite file's input dequantisation.
    """

    input_scale: float
    input_zero_point: float
    stem: ConvSpec
    blocks: tuple[BlockSpec, ...]
    head: ConvSpec
    num_classes: int

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (tuples become lists); inverse of ``from_json``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MobileNetV2Layout:
        def conv(item: dict[str, Any] | None) -> ConvSpec | None:
            if item is None:
                return None
            padding = item["padding"]
            if not isinstance(padding, str):
                padding = tuple(tuple(int(v) for v in pair) for pair in padding)
            return ConvSpec(
                features=int(item["features"]),
                kernel_size=tuple(item["kernel_size"]),
                strides=tuple(item["strides"]),
                padding=padding,
                activation=item["activation"],
                depthwise=bool(item["depthwise"]),
            )

        blocks = tuple(
            BlockSpec(conv(b["expand"]), conv(b["depthwise"]), conv(b["project"]), b["residual"])
            for b in data["blocks"]
        )
        return cls(
            input_scale=float(data["input_scale"]),
            input_zero_point=float(data["input_zero_point"]),
            stem=conv(data["stem"]),
            blocks=blocks,
            head=conv(data["head"]),
            num_classes=int(data["num_classes"]),
        )


def _standard_layout() -> MobileNetV2Layout:
    """MobileNetV2 1.0 (Sandler et al., Table 2) with TF padding and 1001 ImageNet classes."""
    blocks = []
    channels = 32
    # (expansion t, output channels c, repeats n, first stride s)
    for expansion, out_channels, repeats, first_stride in (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ):
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            hidden = channels * expansion
            blocks.append(
                BlockSpec(
                    expand=None if expansion == 1 else ConvSpec(hidden, (1, 1)),
                    depthwise=ConvSpec(hidden, (3, 3), (stride, stride), depthwise=True),
                    project=ConvSpec(out_channels, (1, 1), activation="none"),
                    residual=stride == 1 and channels == out_channels,
                )
            )
            channels = out_channels
    return MobileNetV2Layout(
        input_scale=1.0 / 127.5,
        input_zero_point=127.5,
        stem=ConvSpec(32, (3, 3), (2, 2)),
        blocks=tuple(blocks),
        head=ConvSpec(1280, (1, 1)),
        num_classes=1001,
    )


DEFAULT_LAYOUT = _standard_layout()


def stage_blocks(layout: MobileNetV2Layout) -> dict[str, int]:
    """{"strideS": index of the last block whose output has stride S} for S in 4, 8, 16, 32."""
    stride = layout.stem.strides[0]
    last_block: dict[str, int] = {}
    for index, block in enumerate(layout.blocks):
        stride *= block.depthwise.strides[0]
        last_block[f"stride{stride}"] = index
    return {name: last_block[name] for name in MOBILENET_STAGES[:-1] if name in last_block}


class DepthwiseConv(nn.Module):
    """Depthwise convolution (one filter per channel, multiplier 1) with bias.

    Same parameters and result as ``nn.Conv(C, kernel_size, feature_group_count=C)`` (kernel
    [kh, kw, 1, C], bias [C]), computed as a sum of kh * kw shifted, per-channel scaled copies
    of the input: XLA fuses that into one elementwise loop, several times faster on CPU than
    its grouped convolution.
    """

    kernel_size: tuple[int, int]
    strides: tuple[int, int]
    padding: Padding

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, H', W', C]."""
        batch, height, width, channels = x.shape
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (*self.kernel_size, 1, channels)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (channels,))
        if isinstance(self.padding, str):
            pads = jax.lax.padtype_to_pads(
                (height, width), self.kernel_size, self.strides, self.padding
            )
        else:
            pads = self.padding
        x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
        (kernel_h, kernel_w), (stride_h, stride_w) = self.kernel_size, self.strides
        out_h = (x.shape[1] - kernel_h) // stride_h + 1
        out_w = (x.shape[2] - kernel_w) // stride_w + 1
        out = None
        for row in range(kernel_h):
            for col in range(kernel_w):
                tap = jax.lax.slice(
                    x,
                    (0, row, col, 0),
                    (
                        batch,
                        row + (out_h - 1) * stride_h + 1,
                        col + (out_w - 1) * stride_w + 1,
                        channels,
                    ),
                    (1, stride_h, stride_w, 1),
                )
                term = tap * kernel[row, col, 0]
                out = term if out is None else out + term
        return out + bias


def conv_activation(spec: ConvSpec, x: jax.Array, name: str) -> jax.Array:
    """Applies a ``ConvSpec`` (convolution with bias named ``name``, then its activation).

    Must be called inside a compact method (it creates the convolution submodule).
    """
    if spec.depthwise:
        if spec.features != x.shape[-1]:
            raise ValueError(f"{name}: depthwise convolutions need as many outputs as inputs")
        x = DepthwiseConv(spec.kernel_size, spec.strides, spec.padding, name=name)(x)
    else:
        x = nn.Conv(
            spec.features,
            spec.kernel_size,
            strides=spec.strides,
            padding=spec.padding,
            precision=HIGHEST,
            name=name,
        )(x)
    if spec.activation == "relu6":
        return jnp.clip(x, 0.0, 6.0)
    if spec.activation == "relu":
        return nn.relu(x)
    if spec.activation == "none":
        return x
    raise ValueError(f"unknown activation {spec.activation!r}; expected one of {ACTIVATIONS}")


class InvertedResidual(nn.Module):
    """A ``BlockSpec``: submodules ``expand`` (optional), ``depthwise``, ``project``."""

    spec: BlockSpec

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = x
        if self.spec.expand is not None:
            out = conv_activation(self.spec.expand, out, "expand")
        out = conv_activation(self.spec.depthwise, out, "depthwise")
        out = conv_activation(self.spec.project, out, "project")
        return x + out if self.spec.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 from a layout; returns an ordered dict of the stages named in ``layers``.

    Nothing after the deepest requested stage is computed (nor initialised).
    """

    layout: MobileNetV2Layout = DEFAULT_LAYOUT
    layers: tuple[str, ...] = ("stride8", "stride16")

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """images: [B, H, W, 3] uint8/float RGB 0..255 -> {stage: [B, h, w, C] float32}."""
        return self.forward_normalized(self.normalize_input(images))

    def normalize_input(self, images: jax.Array) -> jax.Array:
        """Pixels 0..255 -> the float32 input of ``forward_normalized`` (about [-1, 1])."""
        scale = jnp.float32(self.layout.input_scale)
        zero_point = jnp.float32(self.layout.input_zero_point)
        return scale * (images.astype(jnp.float32) - zero_point)

    @nn.compact
    def forward_normalized(self, x: jax.Array) -> dict[str, jax.Array]:
        """x: [B, H, W, 3] float32 already mapped to the network's input range (about [-1, 1])."""
        stage_ends = stage_blocks(self.layout)
        valid = (*stage_ends, "logits")
        unknown = [name for name in self.layers if name not in valid]
        if unknown or not self.layers:
            raise ValueError(
                f"MobileNetV2 layers must be a non-empty subset of {valid}, "
                f"got {tuple(self.layers)}"
            )
        outputs: dict[str, jax.Array] = collections.OrderedDict()
        last_needed = max(
            len(self.layout.blocks) if name == "logits" else stage_ends[name]
            for name in self.layers
        )
        block_stage = {index: name for name, index in stage_ends.items()}

        x = conv_activation(self.layout.stem, x, "stem")
        for index, block in enumerate(self.layout.blocks):
            x = InvertedResidual(block, name=f"block{index}")(x)
            if block_stage.get(index) in self.layers:
                outputs[block_stage[index]] = x
            if index == last_needed:
                return outputs
        x = conv_activation(self.layout.head, x, "head")
        pooled = jnp.mean(x, axis=(1, 2))
        outputs["logits"] = nn.Dense(self.layout.num_classes, precision=HIGHEST, name="logits")(
            pooled
        )
        return outputs
