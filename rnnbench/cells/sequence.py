"""One autograd Function for a whole layer's time loop, for cells that declare their step's backward.

A per-step loop under autograd records a dozen graph nodes per step, and its backward runs T small
weight-gradient matmuls. Like haste, a cell that writes its step's backward by hand instead gets:

- a forward loop that records nothing for autograd and keeps only what the backward reads
  (the ``saved`` tensors of each step, e.g. the gate activations);
- one hand-written reverse loop, which returns the gradient of every step's projected input;
- the recurrent weights' gradients after the loop, from all steps at once (for a matrix: one large
  ``[P, T*B] @ [T*B, H]`` matmul instead of T small ones).

The gradients of the input projection (``W_ih``, biases, the layer's input) come from autograd, from
the projected-input gradient this Function returns: one large matmul too, as before.

Padding: a mask per step (None where every sequence is still running) keeps the state of finished
sequences and zeroes their outputs, exactly as the encoder's autograd loop does; the backward applies
the same masks, so a cell's step backward never sees them.

A cell opts in by defining, in the same class that defines ``forward_projected`` (so a subclass that
changes the equations never inherits a stale backward):

``recurrent_weights() -> tuple[Tensor, ...]``
    what the step reads besides its projected input and state (parameters, or tensors computed from
    them: autograd carries their gradients on to the parameters);
``step_forward(weights, xp_t, state) -> (h_t, new_state, saved)``
    one step, called under ``no_grad``; ``saved`` is a tuple of tensors the backward will need;
``step_backward(weights, saved, grad_h, grad_state) -> (grad_xp_t, grad_state_prev)``
    ``grad_h``: gradient of the step's output; ``grad_state``: of its new state (same structure);
    if it accepts an ``out`` keyword, it gets the slice of the ``[T, B, P]`` gradient buffer to write
    ``grad_xp_t`` into (saves stacking T tensors afterwards);
``weight_grads(weights, grad_xp, saved) -> tuple[Tensor | None, ...]``
    after the loop: ``grad_xp`` is every step's projected-input gradient, ``[T, B, P]``, and
    ``saved`` the per-step saved tuples, in time order. One gradient per recurrent weight.

and optionally ``prepare_weights(weights, batch_size)``: called once per sequence; what it returns is
the ``weights`` the three step methods receive (the lstm cells pack W_hh for oneDNN there, see
rnnbench.cells.kernels).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import cache

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

STEP_METHODS = ("recurrent_weights", "step_forward", "step_backward", "weight_grads")


def declares_step_backward(cell) -> bool:
    """True when the class that defines ``forward_projected`` also defines every step method."""
    cls = type(cell)

    def owner(name: str):
        return next((k for k in cls.__mro__ if name in k.__dict__), None)

    equations = owner("forward_projected")
    return equations is not None and all(owner(name) is equations for name in STEP_METHODS)


@cache
def _writes_into(cls: type) -> bool:
    return "out" in inspect.signature(cls.step_backward).parameters


def _parts(state) -> tuple[Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def _rebuild(parts: Sequence[Tensor], like_tuple: bool):
    return tuple(parts) if like_tuple else parts[0]


class _SequenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cell, masks, state_is_tuple, n_state, xp, *tensors):
        state0, weights_in = tensors[:n_state], tensors[n_state:]
        # Under autocast the projection arrives in the low-precision dtype: the whole recurrence runs
        # in that dtype, with autocast off so no op inside changes it behind the loop's back.
        dtype = xp.dtype
        with torch.autocast(xp.device.type, enabled=False):
            weights = tuple(w.to(dtype) for w in weights_in)
            prepare = getattr(cell, "prepare_weights", None)
            if prepare is not None:
                weights = prepare(weights, xp.shape[1])
            state = _rebuild([s.to(dtype) for s in state0], state_is_tuple)
            outputs, saved = [], []
            for xp_t, mask in zip(xp.unbind(0), masks):
                h, new, kept = cell.step_forward(weights, xp_t, state)
                if mask is not None:  # finished sequences keep their state and output zeros
                    new = _rebuild(
                        [torch.where(mask, n, o) for n, o in zip(_parts(new), _parts(state))], state_is_tuple
                    )
                    h = h * mask
                outputs.append(h)
                saved.append(kept)
                state = new
            out = torch.stack(outputs)
        ctx.cell, ctx.masks, ctx.state_is_tuple = cell, masks, state_is_tuple
        ctx.weights, ctx.dtype, ctx.xp_shape = weights, dtype, xp.shape
        # Through save_for_backward, not as ctx attributes: autograd's saved-tensor hooks (the memory
        # `rnnbench bench` and train_memory_mib count, offloading) then see every one of them.
        ctx.layout = [len(kept) for kept in saved]
        ctx.save_for_backward(*(t for kept in saved for t in kept))
        ctx.in_dtypes = [t.dtype for t in tensors]
        return (out, *_parts(state))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *grad_final):
        # Autograd hands zeros (not None) for outputs nobody used: grads are materialised by default.
        cell, masks, weights, dtype = ctx.cell, ctx.masks, ctx.weights, ctx.dtype
        flat, saved, start = ctx.saved_tensors, [], 0
        for size in ctx.layout:
            saved.append(flat[start : start + size])
            start += size
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_out = grad_out.to(dtype)
            grad_state = [g.to(dtype) for g in grad_final]
            into = _writes_into(type(cell))
            grad_xp = grad_out.new_empty(ctx.xp_shape) if into else None
            grads_xp: list[Tensor] = [grad_out] * len(saved)  # placeholders, all overwritten
            for t in range(len(saved) - 1, -1, -1):
                g_h, mask = grad_out[t], masks[t]
                if mask is not None:
                    # A finished sequence's state passed straight through this step, untouched.
                    passed = [g.masked_fill(mask, 0.0) for g in grad_state]
                    keep = ~mask
                    grad_state = [g.masked_fill(keep, 0.0) for g in grad_state]
                    g_h = g_h.masked_fill(keep, 0.0)
                g_state = _rebuild(grad_state, ctx.state_is_tuple)
                if into:
                    g_xp, g_prev = cell.step_backward(weights, saved[t], g_h, g_state, out=grad_xp[t])
                else:
                    g_xp, g_prev = cell.step_backward(weights, saved[t], g_h, g_state)
                grad_state = list(_parts(g_prev))
                if mask is not None:
                    grad_state = [g + p for g, p in zip(grad_state, passed)]
                grads_xp[t] = g_xp
            if not into:
                grad_xp = torch.stack(grads_xp)
            weight_grads = tuple(cell.weight_grads(weights, grad_xp, saved))
        n_state = len(grad_final)
        in_dtypes = ctx.in_dtypes
        grads_state0 = [g.to(d) for g, d in zip(grad_state, in_dtypes[:n_state])]
        grads_w = [None if g is None else g.to(d) for g, d in zip(weight_grads, in_dtypes[n_state:])]
        return (None, None, None, None, grad_xp, *grads_state0, *grads_w)


def run_sequence(cell, xp: Tensor, state, masks: Sequence[Tensor | None]) -> tuple[Tensor, object]:
    """Run ``cell`` over the time-major projected inputs ``xp [T, B, P]`` from ``state``.

    Returns outputs ``[T, B, H]`` (zeros where masked) and the final state, with gradients from the
    cell's hand-written step backward.
    """
    is_tuple = isinstance(state, tuple)
    state0 = _parts(state)
    weights = tuple(cell.recurrent_weights())
    out, *final = _SequenceFunction.apply(cell, list(masks), is_tuple, len(state0), xp, *state0, *weights)
    return out, _rebuild(final, is_tuple)
