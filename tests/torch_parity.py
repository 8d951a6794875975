"""Float64 torch re-implementations of torchvision layers that carry, with every activation x, a
bound e on |x32 - x| for ANY float32 evaluation x32 of the same layers on the same float32
weights (every summation order: XLA's and torch's alike). The backbone tests build their
networks from these operations and check ours (and torchvision's float32 run) against the
float64 value within the bound, stage by stage.

Rules (u = 2^-24, gamma_K from float_rounding; tensors NCHW float64):

* a K-term convolution (or linear layer) of x32 is within ``|W| ((1 + gamma_K) e + gamma_K |x|)``
  of the exact one (plus ``gamma_K |b|`` with a bias);
* eval-mode BatchNorm ``(x - m) a + b`` (a = scale / sqrt(var + eps)) adds
  ``BATCH_NORM_ROUNDINGS u (|x| |a| + |m| |a| + |b|)`` to ``|a| e``;
* ReLU keeps e (1-Lipschitz) and zeroes it where x < -e (both results are then 0); max pooling
  takes the window's largest e; a k-term mean adds ``gamma_{k+1}`` of the mean of ``|x| + e``;
  a sum adds u |sum| to e1 + e2; concatenation concatenates.

Bounds compound through layers (|W| has no cancellation), so the tests check them per stage,
from the reference's own stage input.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as torch_f
from float_rounding import UNIT_ROUNDOFF, gamma

# Rounding of BatchNorm, in units of u relative to |x - mean| |a| + |mean| |a| + |bias|:
# var + eps, the square root and reciprocal (3 units: fast approximations are within 2 ulp),
# the product with the scale, x - mean (or mean * a), the product with a, the sum with the bias;
# 10 covers every order in which torch or XLA fuse them.
BATCH_NORM_ROUNDINGS = 10
EPSILON = 1e-5


def start(nchw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 input and the bound of its float32 rounding, u |x| (0 when already float32)."""
    x = torch.from_numpy(np.asarray(nchw, np.float64))
    exact_in_float32 = np.asarray(nchw).dtype == np.float32
    return x, torch.zeros_like(x) if exact_in_float32 else UNIT_ROUNDOFF * x.abs()


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.numpy().transpose(0, 2, 3, 1)


class BoundedLayers:
    """The layers of a torchvision network (its state dict, in float64) with rounding bounds;
    each takes and returns ``(x, e)``, the float64 value and its bound."""

    def __init__(self, state_dict: dict[str, np.ndarray]):
        self.tensors = {
            key: torch.from_numpy(np.asarray(value, np.float64))
            for key, value in state_dict.items()
            if not key.endswith("num_batches_tracked")
        }

    def conv(self, x, e, key, stride, groups=1):
        weight = self.tensors[f"{key}.weight"]
        g = gamma(weight[0].numel())
        pad = weight.shape[-1] // 2
        value = torch_f.conv2d(x, weight, stride=stride, padding=pad, groups=groups)
        bound = torch_f.conv2d(
            (1 + g) * e + g * x.abs(), weight.abs(), stride=stride, padding=pad, groups=groups
        )
        return value, bound

    def linear(self, x, e, key):
        weight, bias = self.tensors[f"{key}.weight"], self.tensors[f"{key}.bias"]
        g = gamma(weight.shape[1] + 1)
        value = x @ weight.T + bias
        return value, ((1 + g) * e + g * x.abs()) @ weight.abs().T + g * bias.abs()

    def batch_norm(self, x, e, key):
        """Eval mode, ``(x - mean) * (scale / sqrt(var + eps)) + bias``."""
        scale, bias, mean, var = (
            self.tensors[f"{key}.{name}"].view(1, -1, 1, 1)
            for name in ("weight", "bias", "running_mean", "running_var")
        )
        a = scale / torch.sqrt(var + EPSILON)
        rounding = BATCH_NORM_ROUNDINGS * UNIT_ROUNDOFF
        value = (x - mean) * a + bias
        terms = (x.abs() + e + mean.abs()) * a.abs() + bias.abs()
        return value, (1 + rounding) * a.abs() * e + rounding * terms

    @staticmethod
    def relu(x, e):
        return x.clamp(min=0), torch.where(x < -e, torch.zeros_like(e), e)

    @staticmethod
    def max_pool(x, e, size, stride, padding):
        return torch_f.max_pool2d(x, size, stride, padding), torch_f.max_pool2d(
            e, size, stride, padding
        )

    @staticmethod
    def avg_pool(x, e, size):
        g = gamma(size * size + 1)
        return torch_f.avg_pool2d(x, size), torch_f.avg_pool2d(e + g * (x.abs() + e), size)

    @staticmethod
    def spatial_mean(x, e):
        """[B, C, h, w] -> [B, C], the mean over the grid."""
        g = gamma(x.shape[2] * x.shape[3] + 1)
        return x.mean((2, 3)), (e + g * (x.abs() + e)).mean((2, 3))

    @staticmethod
    def add(x1, e1, x2, e2):
        total, bound = x1 + x2, e1 + e2
        return total, bound + UNIT_ROUNDOFF * (total.abs() + bound)

    @staticmethod
    def concat(x1, e1, x2, e2):
        return torch.cat([x1, x2], 1), torch.cat([e1, e2], 1)
