"""Fused torch ops for the core's position-wise layers (``Backend.native_layer_ops``).

Each replaces several standard Array-API passes over a ``(batch, length, width)`` array by
one ATen kernel whose autograd rule matches the core's hand-written one: ``linear`` (GEMM
with the bias fused), ``relu`` (``threshold_backward``: no gradient at 0, as the core's rule)
and ``layer_norm`` (biased variance, ``eps`` inside the square root). Tests compare them with
the standard path (``tests/test_layer_ops.py``); ``reformer_core.standard_path()`` turns them off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dense", "relu", "layer_norm"]


def dense(x, weight, bias):
    # F.linear multiplies by weight.T: the transposed view of the core's (d_in, d_out) weight.
    return F.linear(x, weight.mT, bias)


def relu(x):
    return torch.relu(x)


def layer_norm(x, scale, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), scale, bias, eps)
