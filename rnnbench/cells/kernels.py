"""Matmuls of the generic path through oneDNN on CPU.

PyTorch sends a float32 ``mm``/``addmm``/``linear`` on CPU to MKL, and MKL takes a slow code path on
AMD CPUs; ``nn.LSTM`` runs oneDNN's kernels instead. Measured on the 2-core AMD EPYC this project is
built on (1 thread): 100 per-step ``[64, 256] @ [256, 1024]`` matmuls 42 ms with ``addmm`` vs 20 ms
through oneDNN with the weight packed once; a ``[6400, 256] @ [256, 1024]`` projection 72 ms vs 18 ms.
So on CPU, for float32 and bfloat16, the generic path calls oneDNN through the ops PyTorch's own
compiler uses for CPU linear layers (``torch.ops.mkldnn._linear_pointwise``, with
``_reorder_linear_weight`` to pack a weight once for many calls). Everywhere else (CUDA, float64,
a build without oneDNN) the same functions call ``torch.mm``/``addmm``/``F.linear``: cuBLAS is fast.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


def _available() -> bool:
    if os.environ.get("RNNBENCH_ONEDNN", "1") == "0":  # an escape hatch, and what the tests compare with
        return False
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _available()
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def uses_onednn(*tensors: Tensor) -> bool:
    """True when these tensors' matmuls go through oneDNN (CPU, float32 or bfloat16, no autocast)."""
    return (
        ONEDNN
        and all(t.device.type == "cpu" and t.dtype == tensors[0].dtype for t in tensors)
        and tensors[0].dtype in _ONEDNN_DTYPES
        and not torch.is_autocast_enabled("cpu")
    )


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """``grad^T @ x``: a weight's gradient over every row at once (``[rows, out]``, ``[rows, in]``).

    On oneDNN computed as ``(x^T @ grad)^T``: oneDNN copies a transposed input into a contiguous one
    first, and ``x`` is the narrower of the two (for the lstm's ``W_hh`` at T*B = 6400, H = 256: a
    6.5 MB copy instead of 26 MB; peephole forward+backward 171 vs 179-194 ms with 2 threads)."""
    if uses_onednn(grad, x):
        return _linear(x.t(), grad.t()).t()
    return torch.mm(grad.t(), x)


# Below this hidden size the per-step matmuls are faster through PyTorch's own addmm/mm: oneDNN's
# per-call cost dominates small shapes. Peephole forward+backward, batch 64 x 64 steps, 1 thread,
# ms, oneDNN vs addmm/mm (same process, interleaved): H=40 26.4 vs 19.8; H=97 49.8 vs 43.4;
# H=160 74.3 vs 70.6; H=192 85.1 vs 81.6; H=224 135.4 vs 139.6; H=256 117.7 vs 121.5.
ONEDNN_MIN_HIDDEN = 224


class RecurrentMatmul:
    """``add + h @ W^T`` (forward) and ``g @ W`` (backward) for one weight ``W``, at every step.

    Built once per sequence, which decides the kernel once: on oneDNN the weight is packed once
    for each direction, so the T per-step calls skip re-reading it into the kernel's layout. The
    step's inputs share the weight's device and dtype (the sequence Function runs with autocast
    off), so no step checks them again.
    """

    def __init__(self, weight: Tensor, batch_size: int):
        self.weight = weight
        self.weight_t = weight.t()
        self.packed = uses_onednn(weight) and weight.shape[1] >= ONEDNN_MIN_HIDDEN
        if self.packed:
            reorder = torch.ops.mkldnn._reorder_linear_weight
            self._forward = reorder(weight, batch_size)
            self._backward = reorder(weight.t().contiguous(), batch_size)

    def forward(self, h: Tensor, add: Tensor) -> Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise.binary(h, add.contiguous(), self._forward, None, "add")
        return torch.addmm(add, h, self.weight_t)

    def backward(self, grad: Tensor) -> Tensor:
        if self.packed:
            return _linear(grad.contiguous(), self._backward)
        return torch.mm(grad, self.weight)


class _Linear(torch.autograd.Function):
    """``F.linear`` with forward and backward matmuls through oneDNN (2-D input)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear(x, weight, bias)

    @staticmethod
    @once_differentiable  # oneDNN's op has no derivative of its own
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _linear(grad, weight.t())  # grad @ W
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(grad, x)  # grad^T @ x: one matmul over every row (all steps)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` of any leading shape; oneDNN on CPU where it applies."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if not uses_onednn(*tensors):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return _Linear.apply(flat, weight, bias).reshape(*x.shape[:-1], weight.shape[0])
