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

Batch-parallel chains (CPU): a cell whose step never mixes the rows of a batch may set the class
attribute ``batch_parallel = True`` (in that same class). With more than one torch thread the
Function then splits the batch into row blocks, one per thread (at least ``MIN_CHAIN_ROWS`` rows
each), and runs each block's whole time loop, forward and reverse, in its own thread with
single-threaded kernels; ``prepare_weights``, the step methods and ``weight_grads`` each see one
block (``batch_size``, ``xp_t``, state, ``saved`` and ``grad_xp`` all of its rows), and the blocks'
weight gradients are summed. The threads meet twice per sequence instead of at every step's OpenMP
barrier, and the per-step pointwise ops, which PyTorch keeps on one thread below 32,768 elements,
run on every thread. The step methods must then be thread-safe (no shared mutable state).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from functools import cache

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

STEP_METHODS = ("recurrent_weights", "step_forward", "step_backward", "weight_grads")


def _owner(cls: type, name: str):
    return next((k for k in cls.__mro__ if name in k.__dict__), None)


def _owned_by_equations(cls: type, name: str) -> bool:
    equations = _owner(cls, "forward_projected")
    return equations is not None and _owner(cls, name) is equations


def declares_step_backward(cell) -> bool:
    """True when the class that defines ``forward_projected`` also defines every step method."""
    return all(_owned_by_equations(type(cell), name) for name in STEP_METHODS)


@cache
def _writes_into(cls: type) -> bool:
    return "out" in inspect.signature(cls.step_backward).parameters


def _parts(state) -> tuple[Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def _rebuild(parts: Sequence[Tensor], like_tuple: bool):
    return tuple(parts) if like_tuple else parts[0]


# -- batch-parallel chains ---------------------------------------------------------------------------
# The rows of a batch never meet inside a step (every op is per row, the matmul too), so a batch
# split in row blocks runs as independent chains, one per thread, each a whole time loop with its
# own matmuls. Next to one loop whose per-step matmul spreads over the threads, this parallelises
# the per-step pointwise work as well (ATen keeps an op on one thread below 32,768 elements: a
# [64, 256] gate block is 16,384), and the threads meet twice per sequence (after the forward loop,
# after the reverse loop) instead of at every step's OpenMP barrier, which on a shared machine waits
# for the busier core. Every chain's per-op Python overhead runs under the one interpreter lock, so
# more chains stop paying once that lock is their bottleneck: at most MAX_CHAINS, the threads left
# over go to each chain's kernels (OpenMP inside the chain). Measured on 2 cores only.
MIN_CHAIN_ROWS = 8  # fewer rows per chain: the per-op overhead, paid once per chain, dominates
MAX_CHAINS = 4


def chain_count(cell, xp: Tensor) -> int:
    """How many row chains the Function runs ``cell`` in over ``xp [T, B, P]``: one per torch
    thread (up to MAX_CHAINS, at least MIN_CHAIN_ROWS rows each) on CPU for a cell whose
    equations class sets ``batch_parallel = True``; else 1."""
    if xp.device.type != "cpu" or not _owned_by_equations(type(cell), "batch_parallel"):
        return 1
    if not getattr(cell, "batch_parallel", False):
        return 1
    return max(1, min(torch.get_num_threads(), MAX_CHAINS, xp.shape[1] // MIN_CHAIN_ROWS))


def _chain_spans(cell, xp: Tensor) -> list[tuple[int, int]]:
    chains, batch = chain_count(cell, xp), xp.shape[1]
    bounds = [batch * k // chains for k in range(chains + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(chains)]


_POOL: list = [None, 0, None]  # pid, workers, executor: a forked child must not use its parent's threads


def _pool(workers: int) -> ThreadPoolExecutor:
    if _POOL[0] != os.getpid() or _POOL[1] < workers:
        _POOL[:] = [os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="rnnbench-chain")]
    return _POOL[2]


def _run_chains(fn, items, device_type: str) -> list:
    """``[fn(item) for item in items]``, the first in this thread and the others in worker threads,
    the torch threads shared out among them meanwhile (each chain's kernels get ``threads //
    chains``); grad, inference and autocast modes (thread-local) as here."""
    items = list(items)
    if len(items) == 1:
        return [fn(items[0])]
    threads = torch.get_num_threads()
    each = max(1, threads // len(items))
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def task(item):
        torch.set_num_threads(each)
        # inference_mode(False) turns grad mode on: set grad mode inside it
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            with torch.autocast(device_type, enabled=False):
                return fn(item)

    torch.set_num_threads(each)
    futures = []
    try:
        futures = [_pool(len(items) - 1).submit(task, item) for item in items[1:]]
        first = fn(items[0])
        return [first] + [f.result() for f in futures]
    finally:
        wait(futures)  # every worker done (set its threads) before this thread's count comes back
        torch.set_num_threads(threads)


def _forward_chain(cell, weights, xp: Tensor, state, masks, state_is_tuple: bool):
    """The forward loop over ``xp [T, b, P]``: outputs ``[T, b, H]``, final state parts, the saved
    tuple of every step, and the prepared weights (the backward steps with the same ones)."""
    prepare = getattr(cell, "prepare_weights", None)
    if prepare is not None:
        weights = prepare(weights, xp.shape[1])
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
    return torch.stack(outputs), _parts(state), saved, weights


def _backward_chain(
    cell, weights, saved, masks, grad_out: Tensor, grad_state, state_is_tuple: bool, width: int
):
    """The reverse loop over one chain's steps: ``grad_xp [T, b, P]`` (contiguous), the initial
    state's gradient parts and the recurrent weights' gradients."""
    into = _writes_into(type(cell))
    grad_xp = grad_out.new_empty((len(saved), grad_out.shape[1], width)) if into else None
    grads_xp: list[Tensor] = []
    for t in range(len(saved) - 1, -1, -1):
        g_h, mask = grad_out[t], masks[t]
        if mask is not None:
            # A finished sequence's state passed straight through this step, untouched.
            passed = [g.masked_fill(mask, 0.0) for g in grad_state]
            keep = ~mask
            grad_state = [g.masked_fill(keep, 0.0) for g in grad_state]
            g_h = g_h.masked_fill(keep, 0.0)
        g_state = _rebuild(grad_state, state_is_tuple)
        if into:
            g_xp, g_prev = cell.step_backward(weights, saved[t], g_h, g_state, out=grad_xp[t])
        else:
            g_xp, g_prev = cell.step_backward(weights, saved[t], g_h, g_state)
            grads_xp.append(g_xp)
        grad_state = list(_parts(g_prev))
        if mask is not None:
            grad_state = [g + p for g, p in zip(grad_state, passed)]
    if not into:
        grad_xp = torch.stack(grads_xp[::-1])
    return grad_xp, grad_state, tuple(cell.weight_grads(weights, grad_xp, saved))


class _SequenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cell, masks, state_is_tuple, n_state, xp, *tensors):
        state0, weights_in = tensors[:n_state], tensors[n_state:]
        # Under autocast the projection arrives in the low-precision dtype: the whole recurrence runs
        # in that dtype, with autocast off so no op inside changes it behind the loop's back.
        dtype = xp.dtype
        with torch.autocast(xp.device.type, enabled=False):
            weights = tuple(w.to(dtype) for w in weights_in)
            state = [s.to(dtype) for s in state0]
            spans = _chain_spans(cell, xp)

            def chain(span):
                lo, hi = span
                part = xp if len(spans) == 1 else xp[:, lo:hi]
                return _forward_chain(
                    cell,
                    weights,
                    part,
                    _rebuild([s[lo:hi] for s in state], state_is_tuple),
                    [None if m is None else m[lo:hi] for m in masks],
                    state_is_tuple,
                )

            results = _run_chains(chain, spans, xp.device.type)
            if len(results) == 1:
                out, final, saved, prepared = results[0]
                chains_saved, chains_weights = [saved], [prepared]
            else:
                out = torch.cat([r[0] for r in results], dim=1)
                final = tuple(torch.cat(parts) for parts in zip(*(r[1] for r in results)))
                chains_saved, chains_weights = [r[2] for r in results], [r[3] for r in results]
        ctx.cell, ctx.masks, ctx.state_is_tuple, ctx.spans = cell, masks, state_is_tuple, spans
        ctx.weights, ctx.dtype, ctx.xp_shape = chains_weights, dtype, xp.shape
        # Through save_for_backward, not as ctx attributes: autograd's saved-tensor hooks (the memory
        # `rnnbench bench` and train_memory_mib count, offloading) then see every one of them.
        ctx.layout = [[len(kept) for kept in saved] for saved in chains_saved]
        ctx.save_for_backward(*(t for saved in chains_saved for kept in saved for t in kept))
        ctx.in_dtypes = [t.dtype for t in tensors]
        return (out, *final)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *grad_final):
        # Autograd hands zeros (not None) for outputs nobody used: grads are materialised by default.
        cell, masks, dtype, spans = ctx.cell, ctx.masks, ctx.dtype, ctx.spans
        flat, chains_saved, start = ctx.saved_tensors, [], 0
        for layout in ctx.layout:
            saved = []
            for size in layout:
                saved.append(flat[start : start + size])
                start += size
            chains_saved.append(saved)
        width = ctx.xp_shape[2]
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_out = grad_out.to(dtype)
            grad_state = [g.to(dtype) for g in grad_final]
            grad_xp = grad_out.new_empty(ctx.xp_shape) if len(spans) > 1 else None

            def chain(index):
                lo, hi = spans[index]
                whole = len(spans) == 1
                result = _backward_chain(
                    cell,
                    ctx.weights[index],
                    chains_saved[index],
                    [None if m is None else m[lo:hi] for m in masks],
                    grad_out if whole else grad_out[:, lo:hi],
                    grad_state if whole else [g[lo:hi] for g in grad_state],
                    ctx.state_is_tuple,
                    width,
                )
                if not whole:  # each chain copies its rows into the [T, B, P] gradient
                    grad_xp[:, lo:hi].copy_(result[0])
                return result

            results = _run_chains(chain, range(len(spans)), grad_out.device.type)
            if len(results) == 1:
                grad_xp, grad_state, weight_grads = results[0]
            else:
                grad_state = [torch.cat(parts) for parts in zip(*(r[1] for r in results))]
                weight_grads = tuple(_sum_grads(grads) for grads in zip(*(r[2] for r in results)))
        n_state = len(grad_final)
        in_dtypes = ctx.in_dtypes
        grads_state0 = [g.to(d) for g, d in zip(grad_state, in_dtypes[:n_state])]
        grads_w = [None if g is None else g.to(d) for g, d in zip(weight_grads, in_dtypes[n_state:])]
        return (None, None, None, None, grad_xp, *grads_state0, *grads_w)


def _sum_grads(grads):
    present = [g for g in grads if g is not None]
    if not present:
        return None
    total = present[0]
    for g in present[1:]:
        total = total + g
    return total


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
