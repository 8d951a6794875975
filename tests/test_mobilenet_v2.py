"""MobileNetV2 from the TFLite files: layout, dequantisation, and agreement with the interpreter."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BOTTLE, SHARED, WEIGHTS
from PIL import Image

from patchcore_jax.backbones import load_backbone
from patchcore_jax.backbones.mobilenet_v2 import (
    DEFAULT_LAYOUT,
    MOBILENET_STAGES,
    DepthwiseConv,
    MobileNetV2,
    stage_blocks,
)
from patchcore_jax.backbones.tflite import read_tflite

# The interpreter warns that keeping intermediate tensors is for debugging: that is our use.
pytestmark = pytest.mark.filterwarnings("ignore:.*experimental_preserve_all_tensors")

PTQ = WEIGHTS / "mobilenet_v2_1.0_224_ptq.tflite"
QUANT = SHARED / "weights" / "mobilenet_v2_1.0_224_quant.tflite"


@functools.cache
def converted(path: Path):
    return read_tflite(path)


class Reference:
    """The TFLite interpreter on one file, reading any tensor dequantised to float."""

    def __init__(self, path: Path):
        import tflite
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True)
        self.interpreter.allocate_tensors()
        self.input_index = self.interpreter.get_input_details()[0]["index"]
        self.details = {d["index"]: d for d in self.interpreter.get_tensor_details()}
        model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
        graph = model.Subgraphs(0)
        self.op_outputs = {}  # operator name -> output tensors in graph order
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            code = model.OperatorCodes(op.OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            self.op_outputs.setdefault(builtin, []).append((op.Inputs(0), op.Outputs(0)))
        self.logits_index = self.op_outputs[tflite.BuiltinOperator.SOFTMAX][0][0]
        # The last residual ADD at 28x28 and at 14x14 are the stride8 and stride16 stages.
        self.stage_index = {}
        for _, out in self.op_outputs[tflite.BuiltinOperator.ADD]:
            shape = tuple(self.details[out]["shape"][1:3])
            name = {(28, 28): "stride8", (14, 14): "stride16"}.get(shape)
            if name:
                self.stage_index[name] = out

    def tensor(self, index: int) -> np.ndarray:
        values = self.interpreter.get_tensor(index)
        scale, zero_point = self.details[index]["quantization"]
        return (values.astype(np.float64) - zero_point) * scale

    def run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """image: [224, 224, 3] uint8 -> {'logits': [1001], 'stride8': ..., 'stride16': ...}."""
        self.interpreter.set_tensor(self.input_index, image[None])
        self.interpreter.invoke()
        out = {"logits": self.tensor(self.logits_index).reshape(-1)}
        out.update({name: self.tensor(i)[0] for name, i in self.stage_index.items()})
        return out


@functools.cache
def photographs() -> tuple[list[str], np.ndarray]:
    """Real photos resized to 224x224: scikit-learn's two samples and 42 MVTec bottles."""
    from sklearn.datasets import load_sample_images

    names = ["sklearn/china.jpg", "sklearn/flower.jpg"]
    images = [
        np.asarray(Image.fromarray(a).resize((224, 224), Image.BILINEAR))
        for a in load_sample_images().images
    ]
    files = sorted(BOTTLE.glob("train/good/*.png"))[::10] + sorted(BOTTLE.glob("test/*/*.png"))[::4]
    for file in files:
        names.append(str(file.relative_to(BOTTLE)))
        images.append(
            np.asarray(Image.open(file).convert("RGB").resize((224, 224), Image.BILINEAR))
        )
    return names, np.stack(images)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_layout_read_from_the_file_is_mobilenet_v2():
    layout, _ = converted(PTQ)
    # Input dequantisation exactly as the file says: real = scale * (q - zero_point).
    assert layout.input_scale == pytest.approx(0.007843137718737125)
    assert layout.input_zero_point == 127.0
    # Same blocks, padding (SAME) and activations (ReLU6, linear projections) as the standard
    # MobileNetV2 1.0 table.
    assert layout.stem == DEFAULT_LAYOUT.stem
    assert layout.blocks == DEFAULT_LAYOUT.blocks
    assert layout.head == DEFAULT_LAYOUT.head
    assert layout.num_classes == 1001
    assert stage_blocks(layout) == {"stride4": 2, "stride8": 5, "stride16": 12, "stride32": 16}


@pytest.mark.parametrize("size", [(14, 14), (15, 12)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((0, 1), (2, 1))])
def test_depthwise_conv_equals_grouped_convolution(size, stride, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *size, 5), dtype=np.float32)
    module = DepthwiseConv((3, 3), (stride, stride), padding)
    variables = module.init(jax.random.key(0), x)
    ours = module.apply(variables, x)
    reference = (
        jax.lax.conv_general_dilated(
            x,
            variables["params"]["kernel"],
            (stride, stride),
            padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=5,
            precision=jax.lax.Precision.HIGHEST,
        )
        + variables["params"]["bias"]
    )
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_stage_shapes_at_224():
    layout, variables = converted(PTQ)
    module = MobileNetV2(layout, MOBILENET_STAGES)
    shapes = jax.eval_shape(
        module.apply, variables, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.uint8)
    )
    assert {k: v.shape for k, v in shapes.items()} == {
        "stride4": (2, 56, 56, 24),
        "stride8": (2, 28, 28, 32),
        "stride16": (2, 14, 14, 96),
        "stride32": (2, 7, 7, 320),
        "logits": (2, 1001),
    }


def test_weights_are_dequantised_per_channel_like_the_interpreter():
    """Our kernels/biases == scale * (q - zero_point) from the interpreter's own tensor view."""
    from ai_edge_litert.interpreter import Interpreter

    _, variables = converted(PTQ)
    interpreter = Interpreter(model_path=str(PTQ))
    by_name = {d["name"]: d for d in interpreter.get_tensor_details()}

    def dequantised(detail):
        q = interpreter.get_tensor(detail["index"]).astype(np.float64)
        params = detail["quantization_parameters"]
        shape = [1] * q.ndim
        shape[params["quantized_dimension"]] = -1
        scales = np.reshape(params["scales"], shape)
        zero_points = np.reshape(params["zero_points"], shape)
        return scales * (q - zero_points)

    kernels = {}
    for detail in by_name.values():
        if len(detail["quantization_parameters"]["scales"]) > 1:
            kernels.setdefault(tuple(detail["shape"]), []).append(detail)
    # stem: per-channel int8 conv weights [32, 3, 3, 3] (OHWI) and int32 biases
    (stem_weights,) = kernels[(32, 3, 3, 3)]
    np.testing.assert_allclose(
        variables["params"]["stem"]["kernel"],
        dequantised(stem_weights).transpose(1, 2, 3, 0),
        rtol=1e-6,
    )
    assert len(stem_weights["quantization_parameters"]["scales"]) == 32
    (stem_bias,) = [
        d
        for d in kernels[(32,)]
        if np.allclose(dequantised(d), variables["params"]["stem"]["bias"], rtol=1e-6)
    ]
    assert interpreter.get_tensor(stem_bias["index"]).dtype == np.int32
    # a per-channel depthwise kernel [1, 3, 3, 96] (quantised along the last axis)
    (block1_depthwise,) = kernels[(1, 3, 3, 96)]
    assert block1_depthwise["quantization_parameters"]["quantized_dimension"] == 3
    np.testing.assert_allclose(
        variables["params"]["block1"]["depthwise"]["kernel"],
        dequantised(block1_depthwise).transpose(1, 2, 0, 3),
        rtol=1e-6,
    )


@pytest.fixture(scope="module")
def ptq_comparison():
    """Our float model and the int8 interpreter on the same photographs."""
    layout, variables = converted(PTQ)
    module = MobileNetV2(layout, ("stride8", "stride16", "logits"))
    names, images = photographs()
    forward = jax.jit(module.apply)
    ours = [forward(variables, images[i : i + 8]) for i in range(0, len(images), 8)]
    ours = {k: np.concatenate([np.asarray(o[k]) for o in ours]) for k in ours[0]}
    reference = Reference(PTQ)
    theirs = [reference.run(image) for image in images]
    theirs = {k: np.stack([t[k] for t in theirs]) for k in theirs[0]}
    return names, ours, theirs


def test_top1_agrees_with_the_tflite_interpreter(ptq_comparison):
    """On the 10 photos where the reference is most decisive (largest top-1 - top-2 logit gap,
    judged from the interpreter alone), our float model picks the same class on >= 9."""
    names, ours, theirs = ptq_comparison
    top2 = np.sort(theirs["logits"], axis=1)[:, -2:]
    decisive = np.argsort(top2[:, 0] - top2[:, 1])[:10]
    agree = ours["logits"].argmax(1) == theirs["logits"].argmax(1)
    print("\ndecisive photos:", [names[i] for i in decisive])
    assert agree[decisive].sum() >= 9, [names[i] for i in decisive if not agree[i]]
    # Over all photos (many near-ties among 1001 classes on bottle close-ups) most still agree.
    assert agree.mean() >= 0.7
    cosines = [cosine(a, b) for a, b in zip(ours["logits"], theirs["logits"], strict=True)]
    print(
        f"\ntop-1 agreement: decisive {agree[decisive].sum()}/10, all {agree.sum()}/"
        f"{len(agree)}; logit cosine mean {np.mean(cosines):.4f} min {np.min(cosines):.4f}"
    )
    assert np.mean(cosines) > 0.99 and np.min(cosines) > 0.98


def test_stage_features_agree_with_the_interpreter(ptq_comparison):
    """The stages PatchCore uses match the interpreter's (dequantised int8) tensors."""
    _, ours, theirs = ptq_comparison
    for name in ("stride8", "stride16"):
        cosines = [cosine(a, b) for a, b in zip(ours[name], theirs[name], strict=True)]
        print(
            f"\n{name} cosine to the interpreter: mean {np.mean(cosines):.4f} "
            f"min {np.min(cosines):.4f}"
        )
        assert np.min(cosines) > 0.98, (name, np.min(cosines))


@pytest.mark.shared_data
def test_quantisation_aware_file_also_converts():
    layout, variables = converted(QUANT)
    assert (layout.input_scale, layout.input_zero_point) == (0.0078125, 128.0)
    assert layout.blocks == DEFAULT_LAYOUT.blocks
    _, images = photographs()
    images = images[:4]
    module = MobileNetV2(layout, ("logits",))
    ours = np.asarray(jax.jit(module.apply)(variables, images)["logits"])
    reference = Reference(QUANT)
    for image, logits in zip(images, ours, strict=True):
        assert cosine(logits, reference.run(image)["logits"]) > 0.99


def test_load_backbone_converts_the_shipped_file_and_stops_early():
    backbone = load_backbone("mobilenet_v2", weights_dir=WEIGHTS)
    assert backbone.layers == ("stride8", "stride16")
    assert backbone.weights_sha256 == (
        "5d3137241276e79c86d14a74fe43581398ae0e815191d3dba45495b810840e8c"
    )
    # only the stem and blocks 0..12 (the last stride-16 block) are kept
    assert set(backbone.variables["params"]) == {"stem", *(f"block{i}" for i in range(13))}
    shapes = jax.eval_shape(
        backbone.feature_maps, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.uint8)
    )
    assert list(shapes) == ["stride8", "stride16"]
