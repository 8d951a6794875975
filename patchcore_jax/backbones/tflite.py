"""TFLite MobileNetV2 files -> ``MobileNetV2Layout`` + Flax variables (float32, dequantised).

Reads the flatbuffer with the TFLite schema bindings (optional extra ``patchcore-jax[tflite]``)
and maps its operator sequence onto ``mobilenet_v2.MobileNetV2``, so the float model computes
what the file's operators compute (batch norm is already folded into each convolution's bias).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from patchcore_jax.backbones.mobilenet_v2 import BlockSpec, ConvSpec, MobileNetV2Layout
from patchcore_jax.files import first_line

_TFLITE_DTYPES = {
    0: np.float32,
    1: np.float16,
    2: np.int32,
    3: np.uint8,
    4: np.int64,
    7: np.int16,
    9: np.int8,
}
_TFLITE_PADDING = {0: "SAME", 1: "VALID"}
_TFLITE_ACTIVATIONS = {0: "none", 1: "relu", 3: "relu6"}


def _import_tflite() -> Any:
    try:
        import tflite
    except ImportError as error:
        raise ImportError(
            "reading .tflite files needs the TFLite schema bindings: "
            "pip install 'patchcore-jax[tflite]'"
        ) from error
    return tflite


class _TFLiteGraph:
    """Read access to the single subgraph of a TFLite flatbuffer: ops, constants, options."""

    def __init__(self, data: bytes, source: str):
        self.tflite = _import_tflite()
        self.data = data
        self.source = source
        self.model = self.tflite.Model.GetRootAsModel(data, 0)
        if self.model.SubgraphsLength() != 1:
            raise ValueError(
                f"{source}: expected one subgraph, found {self.model.SubgraphsLength()}"
            )
        self.graph = self.model.Subgraphs(0)
        codes = {
            value: name
            for name, value in vars(self.tflite.BuiltinOperator).items()
            if not name.startswith("_")
        }
        self.ops = []
        for index in range(self.graph.OperatorsLength()):
            op = self.graph.Operators(index)
            code = self.model.OperatorCodes(op.OpcodeIndex())
            # Newer files put the code in BuiltinCode, older ones in DeprecatedBuiltinCode.
            name = codes.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
            inputs = [op.Inputs(i) for i in range(op.InputsLength())]
            outputs = [op.Outputs(i) for i in range(op.OutputsLength())]
            self.ops.append((name, op, inputs, outputs))

    def shape(self, tensor: int) -> tuple[int, ...]:
        t = self.graph.Tensors(tensor)
        return tuple(int(v) for v in t.ShapeAsNumpy()) if t.ShapeLength() else ()

    def quantization(self, tensor: int) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(scale, zero_point, quantized_dimension) or None for float tensors."""
        q = self.graph.Tensors(tensor).Quantization()
        if q is None or q.ScaleLength() == 0:
            return None
        return (
            q.ScaleAsNumpy().astype(np.float64),
            q.ZeroPointAsNumpy().astype(np.float64),
            int(q.QuantizedDimension()),
        )

    def constant(self, tensor: int) -> np.ndarray:
        """A constant tensor, dequantised (real = scale * (q - zero_point), per tensor or per
        channel along ``quantized_dimension``) to float32; integer tensors without
        quantisation (shapes, pads, axes) come back as they are."""
        t = self.graph.Tensors(tensor)
        buffer = self.model.Buffers(t.Buffer())
        if buffer.DataLength():
            raw = buffer.DataAsNumpy().tobytes()
        elif buffer.Offset() > 1:  # large models keep data after the flatbuffer
            raw = self.data[buffer.Offset() : buffer.Offset() + buffer.Size()]
        else:
            raise ValueError(f"{self.source}: tensor {t.Name().decode()!r} has no constant data")
        if t.Type() not in _TFLITE_DTYPES:
            raise ValueError(f"{self.source}: unsupported tensor type {t.Type()}")
        values = np.frombuffer(raw, dtype=_TFLITE_DTYPES[t.Type()]).reshape(self.shape(tensor))
        quant = self.quantization(tensor)
        if quant is None:
            return values.astype(np.float32) if values.dtype.kind == "f" else values
        scale, zero_point, axis = quant
        if scale.size > 1:
            broadcast = [1] * values.ndim
            broadcast[axis] = scale.size
            scale, zero_point = scale.reshape(broadcast), zero_point.reshape(broadcast)
        return (scale * (values.astype(np.float64) - zero_point)).astype(np.float32)

    def options(self, op: Any, options_class: str) -> Any:
        table = op.BuiltinOptions()
        options = getattr(self.tflite, options_class)()
        options.Init(table.Bytes, table.Pos)
        return options


def read_tflite(path: str | Path) -> tuple[MobileNetV2Layout, dict[str, Any]]:
    """``_read_tflite``, reporting a damaged or foreign file as one ValueError naming it."""
    try:
        return _read_tflite(path)
    except (ValueError, ImportError, OSError):
        raise
    except Exception as error:  # struct.error, IndexError, ... from the flatbuffer reader
        raise ValueError(
            f"{path} is not a readable TFLite MobileNetV2 file ({first_line(error)})"
        ) from error


def _read_tflite(path: str | Path) -> tuple[MobileNetV2Layout, dict[str, Any]]:
    """Maps a TFLite MobileNetV2's operators onto ``MobileNetV2`` and dequantises its weights.

    Recognised sequence: [QUANTIZE] CONV_2D (stem); per block [CONV_2D expand] [PAD]
    DEPTHWISE_CONV_2D CONV_2D (project) [ADD residual]; CONV_2D (head); MEAN or global
    AVERAGE_POOL_2D; CONV_2D 1x1 or FULLY_CONNECTED (logits); then RESHAPE/SQUEEZE/SOFTMAX/
    QUANTIZE/DEQUANTIZE, which do not change the logits' argmax and are not modelled. Each
    convolution keeps the file's padding (SAME/VALID, explicit PAD) and fused activation.
    Anything else raises ValueError naming the operator.

    Returns:
      (layout, variables) with variables = {'params': {...}} of float32 arrays.
    """
    path = Path(path)
    graph = _TFLiteGraph(path.read_bytes(), path.name)
    ops = graph.ops
    position = 0
    graph_input = graph.graph.Inputs(0)
    current = graph_input
    params: dict[str, Any] = {}

    def peek(offset: int = 0) -> str | None:
        index = position + offset
        return ops[index][0] if index < len(ops) else None

    def fail(expected: str) -> ValueError:
        found = f"{peek()} (operator {position})" if peek() else "the end of the graph"
        return ValueError(
            f"{path.name}: expected {expected}, found {found}; only MobileNetV2 "
            "graphs are supported"
        )

    def take(kind: str) -> tuple[Any, list[int], list[int]]:
        nonlocal position, current
        if peek() != kind:
            raise fail(kind)
        _, op, inputs, outputs = ops[position]
        if inputs[0] != current:
            raise ValueError(
                f"{path.name}: operator {position} ({kind}) does not consume the "
                "previous operator's output; not a sequential MobileNetV2"
            )
        position += 1
        current = outputs[0]
        return op, inputs, outputs

    def conv(kind: str) -> tuple[ConvSpec, dict[str, np.ndarray]]:
        explicit_pads = None
        if peek() == "PAD":
            _, inputs, _ = take("PAD")
            pads = graph.constant(inputs[1]).astype(int)
            if pads[0].any() or pads[3].any():
                raise ValueError(f"{path.name}: PAD on batch or channels is not supported")
            explicit_pads = (tuple(int(v) for v in pads[1]), tuple(int(v) for v in pads[2]))
        in_channels = graph.shape(current)[-1]
        op, inputs, _ = take(kind)
        options = graph.options(
            op, "Conv2DOptions" if kind == "CONV_2D" else "DepthwiseConv2DOptions"
        )
        if options.DilationHFactor() != 1 or options.DilationWFactor() != 1:
            raise ValueError(f"{path.name}: dilated convolutions are not supported")
        padding: Any = _TFLITE_PADDING[options.Padding()]
        if explicit_pads is not None:
            if padding != "VALID":
                raise ValueError(f"{path.name}: PAD followed by a SAME convolution")
            padding = explicit_pads
        activation = options.FusedActivationFunction()
        if activation not in _TFLITE_ACTIVATIONS:
            raise ValueError(f"{path.name}: unsupported fused activation {activation}")
        weights = graph.constant(inputs[1])
        if kind == "CONV_2D":  # [out, kh, kw, in] -> [kh, kw, in, out]
            kernel = weights.transpose(1, 2, 3, 0)
        else:  # depthwise [1, kh, kw, channels] -> [kh, kw, 1, channels]
            kernel = weights.transpose(1, 2, 0, 3)
            if kernel.shape[-1] != in_channels:
                raise ValueError(f"{path.name}: depthwise multiplier other than 1 is not supported")
        bias = (
            graph.constant(inputs[2])
            if len(inputs) > 2 and inputs[2] >= 0
            else np.zeros(kernel.shape[-1], np.float32)
        )
        spec = ConvSpec(
            features=int(kernel.shape[-1]),
            kernel_size=(int(kernel.shape[0]), int(kernel.shape[1])),
            strides=(int(options.StrideH()), int(options.StrideW())),
            padding=padding,
            activation=_TFLITE_ACTIVATIONS[activation],
            depthwise=kind == "DEPTHWISE_CONV_2D",
        )
        return spec, {"kernel": np.ascontiguousarray(kernel), "bias": bias}

    # Input: uint8 pixels q are dequantised with the input tensor's own parameters.
    input_quant = graph.quantization(graph_input)
    if input_quant is None:  # float file: the usual MobileNet convention q / 127.5 - 1
        input_scale, input_zero_point = 1.0 / 127.5, 127.5
    else:
        input_scale, input_zero_point = float(input_quant[0][0]), float(input_quant[1][0])
    while peek() in ("QUANTIZE", "DEQUANTIZE"):  # re-quantisation is the identity in float
        take(peek())

    stem, params["stem"] = conv("CONV_2D")
    blocks = []
    while True:
        skip_pad = 1 if peek(1) == "PAD" else 0
        if peek() == "DEPTHWISE_CONV_2D" or (peek() == "PAD" and peek(1) == "DEPTHWISE_CONV_2D"):
            has_expand = False
        elif peek() == "CONV_2D" and peek(1 + skip_pad) == "DEPTHWISE_CONV_2D":
            has_expand = True
        else:
            break
        block_input = current
        block_params = {}
        expand = None
        if has_expand:
            expand, block_params["expand"] = conv("CONV_2D")
        depthwise, block_params["depthwise"] = conv("DEPTHWISE_CONV_2D")
        project, block_params["project"] = conv("CONV_2D")
        residual = False
        if peek() == "ADD":
            _, add, inputs, outputs = ops[position]
            if sorted(inputs) != sorted([block_input, current]):
                raise ValueError(f"{path.name}: ADD at operator {position} is not a residual")
            if graph.options(add, "AddOptions").FusedActivationFunction() != 0:
                raise ValueError(f"{path.name}: residual ADD with a fused activation")
            position += 1
            current = outputs[0]
            residual = True
        params[f"block{len(blocks)}"] = block_params
        blocks.append(BlockSpec(expand, depthwise, project, residual))
    if not blocks:
        raise fail("inverted residual blocks")

    head, params["head"] = conv("CONV_2D")
    spatial = graph.shape(current)[1:3]
    if peek() == "MEAN":
        _, inputs, _ = take("MEAN")
        if sorted(graph.constant(inputs[1]).tolist()) != [1, 2]:
            raise ValueError(f"{path.name}: MEAN is not a global average pool")
    elif peek() == "AVERAGE_POOL_2D":
        op, _, _ = take("AVERAGE_POOL_2D")
        pool = graph.options(op, "Pool2DOptions")
        if (pool.FilterHeight(), pool.FilterWidth()) != spatial or pool.FusedActivationFunction():
            raise ValueError(f"{path.name}: AVERAGE_POOL_2D is not a global average pool")
    else:
        raise fail("MEAN or AVERAGE_POOL_2D (global pool)")
    if peek() in ("RESHAPE", "SQUEEZE"):
        take(peek())
    if peek() == "CONV_2D":
        op, inputs, _ = take("CONV_2D")
        options = graph.options(op, "Conv2DOptions")
        weights = graph.constant(inputs[1])
        if weights.shape[1:3] != (1, 1):
            raise ValueError(f"{path.name}: classifier CONV_2D is not 1x1")
        weights = weights[:, 0, 0, :]
    elif peek() == "FULLY_CONNECTED":
        op, inputs, _ = take("FULLY_CONNECTED")
        options = graph.options(op, "FullyConnectedOptions")
        weights = graph.constant(inputs[1])
    else:
        raise fail("CONV_2D 1x1 or FULLY_CONNECTED (classifier)")
    if options.FusedActivationFunction() != 0:
        raise ValueError(f"{path.name}: classifier with a fused activation")
    num_classes = int(weights.shape[0])
    bias = (
        graph.constant(inputs[2])
        if len(inputs) > 2 and inputs[2] >= 0
        else np.zeros(num_classes, np.float32)
    )
    params["logits"] = {"kernel": np.ascontiguousarray(weights.T), "bias": bias}
    for name, *_ in ops[position:]:
        if name not in ("RESHAPE", "SQUEEZE", "SOFTMAX", "QUANTIZE", "DEQUANTIZE"):
            raise ValueError(f"{path.name}: unsupported operator {name} after the classifier")

    layout = MobileNetV2Layout(
        input_scale=input_scale,
        input_zero_point=input_zero_point,
        stem=stem,
        blocks=tuple(blocks),
        head=head,
        num_classes=num_classes,
    )
    return layout, {"params": params}
