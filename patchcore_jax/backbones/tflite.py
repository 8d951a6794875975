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
from patchcore_jax.errors import MissingDependencyError
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
        raise MissingDependencyError(
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


class _OpCursor:
    """Walks the graph's operators in order, each consuming the previous one's output.

    MobileNetV2 is a chain (residual ADDs aside), so reading it is a walk with one operator of
    lookahead; errors name the file, the operator index and what was expected there.
    """

    def __init__(self, graph: _TFLiteGraph):
        self.graph = graph
        self.ops = graph.ops
        self.name = graph.source
        self.position = 0
        self.current = graph.graph.Inputs(0)  # the tensor the next operator must consume

    def peek(self, offset: int = 0) -> str | None:
        """The kind of the operator ``offset`` ahead, or None past the end of the graph."""
        index = self.position + offset
        return self.ops[index][0] if index < len(self.ops) else None

    def fail(self, expected: str) -> ValueError:
        """The error for an unexpected operator (or end of graph) where ``expected`` belongs."""
        found = (
            f"{self.peek()} (operator {self.position})" if self.peek() else "the end of the graph"
        )
        return ValueError(
            f"{self.name}: expected {expected}, found {found}; only MobileNetV2 "
            "graphs are supported"
        )

    def take(self, kind: str) -> tuple[Any, list[int], list[int]]:
        """Consumes the next operator, which must be a ``kind`` fed by the current tensor."""
        if self.peek() != kind:
            raise self.fail(kind)
        _, op, inputs, outputs = self.ops[self.position]
        if inputs[0] != self.current:
            raise ValueError(
                f"{self.name}: operator {self.position} ({kind}) does not consume the "
                "previous operator's output; not a sequential MobileNetV2"
            )
        self.position += 1
        self.current = outputs[0]
        return op, inputs, outputs


def _optional_bias(graph: _TFLiteGraph, inputs: list[int], features: int) -> np.ndarray:
    """The bias input of a convolution or fully connected op; zeros when the file has none
    (an absent optional input is index -1), so every Flax layer has a bias parameter."""
    return (
        graph.constant(inputs[2])
        if len(inputs) > 2 and inputs[2] >= 0
        else np.zeros(features, np.float32)
    )


def _read_explicit_pads(cursor: _OpCursor) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """An optional PAD before a convolution, as ((top, bottom), (left, right)); None if absent.

    Files may pad explicitly and then convolve with VALID padding; folding the PAD into the
    convolution's padding keeps the pair one layer of ``MobileNetV2``.
    """
    if cursor.peek() != "PAD":
        return None
    _, inputs, _ = cursor.take("PAD")
    pads = cursor.graph.constant(inputs[1]).astype(int)
    if pads[0].any() or pads[3].any():
        raise ValueError(f"{cursor.name}: PAD on batch or channels is not supported")
    return (tuple(int(v) for v in pads[1]), tuple(int(v) for v in pads[2]))


def _conv_kernel(cursor: _OpCursor, kind: str, weights: int, in_channels: int) -> np.ndarray:
    """The file's convolution weights in Flax's [kh, kw, in, out] kernel layout.

    TFLite stores CONV_2D weights as [out, kh, kw, in] and DEPTHWISE_CONV_2D weights as
    [1, kh, kw, channels]; only a depthwise multiplier of 1 maps onto ``MobileNetV2``.
    """
    values = cursor.graph.constant(weights)
    if kind == "CONV_2D":  # [out, kh, kw, in] -> [kh, kw, in, out]
        return values.transpose(1, 2, 3, 0)
    # depthwise [1, kh, kw, channels] -> [kh, kw, 1, channels]
    kernel = values.transpose(1, 2, 0, 3)
    if kernel.shape[-1] != in_channels:
        raise ValueError(f"{cursor.name}: depthwise multiplier other than 1 is not supported")
    return kernel


def _read_conv(cursor: _OpCursor, kind: str) -> tuple[ConvSpec, dict[str, np.ndarray]]:
    """Consumes an optional PAD and a ``kind`` convolution; returns its spec and parameters.

    The spec keeps the file's padding (SAME/VALID, or the PAD's explicit amounts), strides
    and fused activation, so the Flax layer computes what the operator computes.
    """
    explicit_pads = _read_explicit_pads(cursor)
    in_channels = cursor.graph.shape(cursor.current)[-1]
    op, inputs, _ = cursor.take(kind)
    options = cursor.graph.options(
        op, "Conv2DOptions" if kind == "CONV_2D" else "DepthwiseConv2DOptions"
    )
    if options.DilationHFactor() != 1 or options.DilationWFactor() != 1:
        raise ValueError(f"{cursor.name}: dilated convolutions are not supported")
    padding: Any = _TFLITE_PADDING[options.Padding()]
    if explicit_pads is not None:
        if padding != "VALID":
            raise ValueError(f"{cursor.name}: PAD followed by a SAME convolution")
        padding = explicit_pads
    activation = options.FusedActivationFunction()
    if activation not in _TFLITE_ACTIVATIONS:
        raise ValueError(f"{cursor.name}: unsupported fused activation {activation}")
    kernel = _conv_kernel(cursor, kind, inputs[1], in_channels)
    bias = _optional_bias(cursor.graph, inputs, kernel.shape[-1])
    spec = ConvSpec(
        features=int(kernel.shape[-1]),
        kernel_size=(int(kernel.shape[0]), int(kernel.shape[1])),
        strides=(int(options.StrideH()), int(options.StrideW())),
        padding=padding,
        activation=_TFLITE_ACTIVATIONS[activation],
        depthwise=kind == "DEPTHWISE_CONV_2D",
    )
    return spec, {"kernel": np.ascontiguousarray(kernel), "bias": bias}


def _input_dequantisation(graph: _TFLiteGraph, graph_input: int) -> tuple[float, float]:
    """(scale, zero_point) that turn uint8 pixels q into the network's input scale*(q - zp).

    A quantised file says so in its input tensor; a float file follows the usual MobileNet
    convention q / 127.5 - 1.
    """
    input_quant = graph.quantization(graph_input)
    if input_quant is None:
        return 1.0 / 127.5, 127.5
    return float(input_quant[0][0]), float(input_quant[1][0])


def _next_block_has_expand(cursor: _OpCursor) -> bool | None:
    """Whether the next inverted residual block starts with a 1x1 expansion convolution;
    None when the next operators do not start a block (the head convolution follows)."""
    skip_pad = 1 if cursor.peek(1) == "PAD" else 0
    if cursor.peek() == "DEPTHWISE_CONV_2D" or (
        cursor.peek() == "PAD" and cursor.peek(1) == "DEPTHWISE_CONV_2D"
    ):
        return False
    if cursor.peek() == "CONV_2D" and cursor.peek(1 + skip_pad) == "DEPTHWISE_CONV_2D":
        return True
    return None


def _read_residual_add(cursor: _OpCursor, block_input: int) -> bool:
    """Consumes the block's residual ADD if there is one; whether there was.

    The ADD's inputs are the block's input and its projection's output, in either order, so
    it is checked against both rather than through ``_OpCursor.take``.
    """
    if cursor.peek() != "ADD":
        return False
    _, add, inputs, outputs = cursor.ops[cursor.position]
    if sorted(inputs) != sorted([block_input, cursor.current]):
        raise ValueError(f"{cursor.name}: ADD at operator {cursor.position} is not a residual")
    if cursor.graph.options(add, "AddOptions").FusedActivationFunction() != 0:
        raise ValueError(f"{cursor.name}: residual ADD with a fused activation")
    cursor.position += 1
    cursor.current = outputs[0]
    return True


def _read_blocks(cursor: _OpCursor) -> tuple[list[BlockSpec], dict[str, Any]]:
    """Consumes the inverted residual blocks: [CONV_2D expand] [PAD] DEPTHWISE_CONV_2D
    CONV_2D (project) [ADD residual], as many as follow; returns their specs and
    {'block<i>': parameters}. At least one block is required."""
    blocks: list[BlockSpec] = []
    params: dict[str, Any] = {}
    while (has_expand := _next_block_has_expand(cursor)) is not None:
        block_input = cursor.current
        block_params = {}
        expand = None
        if has_expand:
            expand, block_params["expand"] = _read_conv(cursor, "CONV_2D")
        depthwise, block_params["depthwise"] = _read_conv(cursor, "DEPTHWISE_CONV_2D")
        project, block_params["project"] = _read_conv(cursor, "CONV_2D")
        residual = _read_residual_add(cursor, block_input)
        params[f"block{len(blocks)}"] = block_params
        blocks.append(BlockSpec(expand, depthwise, project, residual))
    if not blocks:
        raise cursor.fail("inverted residual blocks")
    return blocks, params


def _read_global_pool(cursor: _OpCursor) -> None:
    """Consumes the global average pool after the head: a MEAN over height and width, or an
    AVERAGE_POOL_2D whose window is the whole feature map (anything else is not modelled)."""
    spatial = cursor.graph.shape(cursor.current)[1:3]
    if cursor.peek() == "MEAN":
        _, inputs, _ = cursor.take("MEAN")
        if sorted(cursor.graph.constant(inputs[1]).tolist()) != [1, 2]:
            raise ValueError(f"{cursor.name}: MEAN is not a global average pool")
    elif cursor.peek() == "AVERAGE_POOL_2D":
        op, _, _ = cursor.take("AVERAGE_POOL_2D")
        pool = cursor.graph.options(op, "Pool2DOptions")
        if (pool.FilterHeight(), pool.FilterWidth()) != spatial or pool.FusedActivationFunction():
            raise ValueError(f"{cursor.name}: AVERAGE_POOL_2D is not a global average pool")
    else:
        raise cursor.fail("MEAN or AVERAGE_POOL_2D (global pool)")


def _read_classifier(cursor: _OpCursor) -> tuple[int, dict[str, np.ndarray]]:
    """Consumes an optional RESHAPE/SQUEEZE and the classifier (CONV_2D 1x1 or
    FULLY_CONNECTED, no fused activation); returns the number of classes and the Dense
    parameters {'kernel': [features, classes], 'bias'}."""
    if cursor.peek() in ("RESHAPE", "SQUEEZE"):
        cursor.take(cursor.peek())
    if cursor.peek() == "CONV_2D":
        op, inputs, _ = cursor.take("CONV_2D")
        options = cursor.graph.options(op, "Conv2DOptions")
        weights = cursor.graph.constant(inputs[1])
        if weights.shape[1:3] != (1, 1):
            raise ValueError(f"{cursor.name}: classifier CONV_2D is not 1x1")
        weights = weights[:, 0, 0, :]
    elif cursor.peek() == "FULLY_CONNECTED":
        op, inputs, _ = cursor.take("FULLY_CONNECTED")
        options = cursor.graph.options(op, "FullyConnectedOptions")
        weights = cursor.graph.constant(inputs[1])
    else:
        raise cursor.fail("CONV_2D 1x1 or FULLY_CONNECTED (classifier)")
    if options.FusedActivationFunction() != 0:
        raise ValueError(f"{cursor.name}: classifier with a fused activation")
    num_classes = int(weights.shape[0])
    bias = _optional_bias(cursor.graph, inputs, num_classes)
    return num_classes, {"kernel": np.ascontiguousarray(weights.T), "bias": bias}


def _check_trailing_ops(cursor: _OpCursor) -> None:
    """Only operators that leave the logits' argmax unchanged may follow the classifier."""
    for name, *_ in cursor.ops[cursor.position :]:
        if name not in ("RESHAPE", "SQUEEZE", "SOFTMAX", "QUANTIZE", "DEQUANTIZE"):
            raise ValueError(f"{cursor.name}: unsupported operator {name} after the classifier")


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
    cursor = _OpCursor(graph)
    # Input: uint8 pixels q are dequantised with the input tensor's own parameters.
    input_scale, input_zero_point = _input_dequantisation(graph, cursor.current)
    while cursor.peek() in ("QUANTIZE", "DEQUANTIZE"):  # re-quantisation is the identity in float
        cursor.take(cursor.peek())
    params: dict[str, Any] = {}
    stem, params["stem"] = _read_conv(cursor, "CONV_2D")
    blocks, block_params = _read_blocks(cursor)
    params.update(block_params)
    head, params["head"] = _read_conv(cursor, "CONV_2D")
    _read_global_pool(cursor)
    num_classes, params["logits"] = _read_classifier(cursor)
    _check_trailing_ops(cursor)
    layout = MobileNetV2Layout(
        input_scale=input_scale,
        input_zero_point=input_zero_point,
        stem=stem,
        blocks=tuple(blocks),
        head=head,
        num_classes=num_classes,
    )
    return layout, {"params": params}
