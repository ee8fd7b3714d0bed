"""Any registered cell x layers x direction, with fused kernels where a cell allows them.

Two paths compute the same function:
- fused: when every cell is exactly nn.RNN/LSTM/GRU, call PyTorch's fused kernel (oneDNN/ATen on
  CPU, cuDNN on GPU) on the cells' own parameters. A padded batch goes packed on CUDA and in dense
  calls on the CPU, where packing would leave oneDNN for a slow step-by-step loop (see
  ``Encoder.padded_path``);
- generic: any cell. The input projection of a whole layer is one matmul before the time loop, the
  loop iterates with ``unbind``, and padded positions keep their state (masked update), so padding
  never changes real outputs or final states. A cell that declares its step's backward (lstm,
  peephole; see rnnbench.cells.sequence) runs the loop as one autograd Function with a hand-written
  reverse loop (the ``sequence`` path); any other cell's loop is recorded by autograd step by step.

Lengths are read on the host (packing, the number of masked steps) and should be a CPU tensor, as
every task gives them: reading device lengths would wait for the device on every batch.

Outputs are ``[batch, time, directions * hidden]`` (zeros at padded positions); final states are a
list indexed ``layer * directions + direction`` of each cell's state (tensor or tuple).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import _VF, Tensor, nn

from rnnbench.cells.base import Cell, State, build_cell
from rnnbench.cells.sequence import declares_step_backward, run_sequence
from rnnbench.data.batching import to_device
from rnnbench.errors import ConfigError

# cudnnRNNMode_t, what torch.backends.cudnn.rnn.get_cudnn_mode returns (it needs a CUDA build to run;
# `rnnbench bench --check` compares the two on a GPU machine).
CUDNN_MODES = {"RNN_RELU": 0, "RNN_TANH": 1, "LSTM": 2, "GRU": 3}
_FUSED_KERNELS = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}
# how the fused kernel runs a padded batch (Encoder.padded_path)
PADDED_PATHS = ("auto", "segments", "masked", "packed")
# kernels whose state is their output and stays bounded (|h| <= max(1, |h0|)) through padded steps
MASKABLE = {"GRU", "RNN_TANH"}


def _map_state(fn, *states: State) -> State:
    if isinstance(states[0], Tensor):
        return fn(*states)
    return tuple(fn(*parts) for parts in zip(*states))


def reverse_padded(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each sequence of ``x [B, T, F]`` within its own length; padding stays at the end.

    ``lengths`` may be on the CPU (copied asynchronously) or already on ``x``'s device."""
    if lengths is None:
        return x.flip(1)
    steps = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    last = (to_device(lengths, x.device) - 1).unsqueeze(1)
    index = torch.where(steps <= last, last - steps, steps)
    return x.gather(1, index.unsqueeze(-1).expand_as(x))


class Encoder(nn.Module):
    """Stack ``num_layers`` of a cell, optionally bidirectional, with dropout between layers."""

    def __init__(
        self,
        cell: str | type[Cell],
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        *,
        fused: bool = True,
        sequence: bool = True,
        padded: str = "auto",
        **cell_hparams,
    ):
        super().__init__()
        if isinstance(cell, str):
            from rnnbench.plugins import get_cell

            self.cell_name, cell_cls = cell, get_cell(cell)
        else:
            self.cell_name, cell_cls = cell.__name__, cell
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ConfigError(f"layers must be an integer >= 1, got {num_layers!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
        if padded not in PADDED_PATHS:
            raise ConfigError(f"padded must be one of {', '.join(PADDED_PATHS)}, got {padded!r}")
        self.padded = padded
        self.input_size, self.hidden_size = input_size, hidden_size
        self.num_layers, self.bidirectional, self.dropout = num_layers, bool(bidirectional), float(dropout)
        self.num_directions = 2 if bidirectional else 1
        self.output_size = hidden_size * self.num_directions
        self.cells = nn.ModuleList(
            build_cell(cell_cls, input_size if layer == 0 else self.output_size, hidden_size, **cell_hparams)
            for layer in range(num_layers)
            for _ in range(self.num_directions)
        )
        modes = {c.fused_kernel() for c in self.cells}
        self.fused_mode: str | None = modes.pop() if fused and len(modes) == 1 else None
        self._hoists = all(
            hasattr(c, "project_input") and hasattr(c, "forward_projected") for c in self.cells
        )
        # The whole-sequence Function with the cells' own step backward, else autograd per step.
        self.sequence_path = bool(sequence) and self._hoists and all(map(declares_step_backward, self.cells))

    # -- cuDNN's flat weight buffer -------------------------------------------------------------------
    def fused_weights(self) -> list[Tensor]:
        """The fused kernel's weight list, in nn.RNNBase's ``_flat_weights`` order: for each layer and
        direction, ``weight_ih, weight_hh, bias_ih, bias_hh``."""
        return [p for c in self.cells for p in (c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh)]

    def cudnn_flatten_arguments(self) -> tuple:
        """What ``torch._cudnn_rnn_flatten_weight`` gets, as ``nn.RNNBase.flatten_parameters`` calls it."""
        mode = CUDNN_MODES[self.fused_mode]
        return (
            self.fused_weights(),
            4,
            self.input_size,
            mode,
            self.hidden_size,
            0,
            self.num_layers,
            True,
            self.bidirectional,
        )

    def flatten_parameters(self) -> None:
        """Make the fused weights views into one contiguous buffer, in cuDNN's layout.

        cuDNN reads all weights from one buffer; handed separate tensors, it copies them into a new
        buffer on every call (and warns each time). As ``nn.RNNBase.flatten_parameters``: only on
        CUDA with cuDNN; the parameters stay the same objects (the optimizer's), their storage moves.
        Called after every ``.to()``/``.cuda()`` and again by a forward that finds the weights apart.
        """
        if self.fused_mode is None:
            return
        weights = self.fused_weights()
        first = weights[0]
        if not all(
            w.is_cuda and w.dtype == first.dtype and torch.backends.cudnn.is_acceptable(w) for w in weights
        ):
            return
        if len({w.data_ptr() for w in weights}) != len(weights):  # aliased weights: cuDNN would break them
            return
        with torch.cuda.device_of(first), torch.no_grad():
            if torch._use_cudnn_rnn_flatten_weight():
                torch._cudnn_rnn_flatten_weight(*self.cudnn_flatten_arguments())

    def weights_are_flat(self) -> bool:
        """True when every fused weight lives in one storage (host-side metadata only: no sync)."""
        return len({w.untyped_storage().data_ptr() for w in self.fused_weights()}) == 1

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self.flatten_parameters()  # .to()/.cuda()/.half() gave the parameters new, separate storages
        return result

    def extra_repr(self) -> str:
        path = f"fused={self.fused_mode}" if self.fused_mode else "generic"
        if not self.fused_mode and self.sequence_path:
            path += ", sequence"
        return f"layers={self.num_layers}, bidirectional={self.bidirectional}, dropout={self.dropout}, {path}"

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> list[State]:
        return [c.init_state(batch_size, device=device, dtype=dtype) for c in self.cells]

    def forward(
        self, x: Tensor, lengths: Tensor | None = None, state: Sequence[State] | None = None
    ) -> tuple[Tensor, list[State]]:
        """``x``: ``[batch, time, input]``; ``lengths``: true lengths ``[batch]`` (None = all full)."""
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(
                f"encoder expects input of shape [batch, time, {self.input_size}], got {list(x.shape)}"
            )
        batch, steps = x.shape[0], x.shape[1]
        if lengths is not None:
            if lengths.shape != (batch,):
                raise ValueError(f"lengths must have shape [{batch}], got {list(lengths.shape)}")
            if lengths.device.type != "cpu":
                lengths = lengths.cpu()  # read on the host below, once; CPU lengths cost no sync
            ends = lengths.tolist()  # cheaper than a reduction for a batch's few lengths
            shortest, longest = (min(ends), max(ends)) if ends else (0, 0)
            if steps == 0 or shortest < 1 or longest > steps:
                raise ValueError(f"lengths must lie in [1, {steps}], got min {shortest} max {longest}")
            if shortest == steps:
                lengths = None  # all full: no masking or packing needed
        if state is not None and len(state) != len(self.cells):
            raise ValueError(
                f"state must hold {len(self.cells)} cell states (layers x directions), got {len(state)}"
            )
        if self.fused_mode is not None:
            return self._forward_fused(x, lengths, state)
        return self._forward_generic(x, lengths, state)

    # -- fused ---------------------------------------------------------------------------------
    def padded_path(self, x: Tensor) -> str:
        """How the fused kernel runs a padded batch (``padded``; ``auto`` picks by device). The
        generic path masks its updates unless ``padded="segments"`` (``_forward_generic``).

        - ``packed``: one call on a packed sequence; ``auto`` on CUDA, where cuDNN runs packed
          sequences natively. On the CPU it is the slow one: a packed sequence leaves oneDNN's LSTM
          for ATen's step-by-step loop, whose backward zero-fills a buffer the size of the whole
          packed input projection (``[tokens, 4 * hidden]``) for every step's slice of it: time
          quadratic in the length (55% of an LSTM training step at SST-2 lengths, ``aten::fill_``).
        - ``segments``: dense calls over the time spans in which no sequence ends
          (``_run_segments``); exact for every kernel; ``auto`` on the CPU.
        - ``masked``: layer by layer and direction by direction, one dense call over the whole
          padded batch with zeroed padding, the outputs masked and each final state read from the
          output at the sequence's last real step (``_run_masked``). Exact only where the state is
          the output and stays bounded through the padding (GRU, tanh RNN; other kernels fall back
          to segments). Measured slower than segments on SST-2 and CoNLL-2003 lengths (it computes
          the padded positions), so never chosen by ``auto``; kept to compare.
        """
        if self.padded == "masked" and self.fused_mode not in MASKABLE:
            return "segments"  # its state is not its output (LSTM's c), or can overflow (ReLU)
        if self.padded != "auto":
            return self.padded
        return "packed" if x.is_cuda else "segments"

    def _forward_fused(self, x: Tensor, lengths: Tensor | None, state: Sequence[State] | None):
        is_lstm = self.fused_mode == "LSTM"
        if state is None:
            state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        if is_lstm:
            hx = (torch.stack([s[0] for s in state]), torch.stack([s[1] for s in state]))
        else:
            hx = torch.stack(list(state))
        if x.is_cuda and not self.weights_are_flat():
            self.flatten_parameters()  # e.g. a parameter was replaced since the last .to()
        weights = self.fused_weights()
        kernel = _FUSED_KERNELS[self.fused_mode]
        args = (weights, True, self.num_layers, self.dropout, self.training, self.bidirectional)
        if lengths is None:
            result = kernel(x, hx, *args, True)
            out = result[0]
        elif (path := self.padded_path(x)) != "packed":
            out, hx_n = self._forward_by_layer(kernel, x, lengths, hx if is_lstm else (hx,), path)
            result = (out, *hx_n)
        else:
            # pack_padded_sequence / pad_packed_sequence, minus their blocking copies (sorted indices
            # to the device, unsorted indices back to the host): the permutations are computed on the
            # CPU from CPU lengths and sent over asynchronously.
            sorted_lengths, order_cpu = torch.sort(lengths, descending=True)
            unorder_cpu = torch.empty_like(order_cpu)
            unorder_cpu[order_cpu] = torch.arange(len(order_cpu))
            order, unorder = to_device(order_cpu, x.device), to_device(unorder_cpu, x.device)
            data, batch_sizes = torch._VF._pack_padded_sequence(
                x.index_select(0, order), sorted_lengths, True
            )
            hx = tuple(h.index_select(1, order) for h in hx) if is_lstm else hx.index_select(1, order)
            result = kernel(data, batch_sizes, hx, *args)
            padded, _ = torch._VF._pad_packed_sequence(result[0], batch_sizes, True, 0.0, x.shape[1])
            out = padded.index_select(0, unorder)
            result = (result[0],) + tuple(h.index_select(1, unorder) for h in result[1:])
        if is_lstm:
            final = list(zip(result[1].unbind(0), result[2].unbind(0)))
        else:
            final = list(result[1].unbind(0))
        return out, final

    def _forward_by_layer(self, kernel, x: Tensor, lengths: Tensor, hx: tuple[Tensor, ...], path: str):
        """The padded batch through dense kernel calls (``path``: segments or masked). Segments,
        unidirectional: every layer in each call. Otherwise layer by layer, the backward direction
        on each sequence reversed within its length (as the generic path), since a span of the
        backward direction would need the future. Returns outputs and the stacked final parts."""
        if path == "segments" and not self.bidirectional:
            run = _fused_run(kernel, self.fused_weights(), self.num_layers, self.dropout, self.training)
            return _run_segments(run, x, lengths, hx, 1)
        real = None
        if path == "masked":  # [B, T, 1]: True at real positions, on x's device
            steps = torch.arange(x.shape[1], device=x.device)
            real = (steps < to_device(lengths, x.device).unsqueeze(1)).unsqueeze(-1)
        layer_input, finals = x, []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                c = self.cells[k]
                weights = [c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh]
                seq = layer_input if direction == 0 else reverse_padded(layer_input, lengths)
                state = tuple(h[k : k + 1] for h in hx)
                if real is not None:
                    out, h_n = _run_masked(kernel, seq, lengths, real, state, weights, self.training)
                else:
                    run = _fused_run(kernel, weights, 1, 0.0, self.training)
                    out, h_n = _run_segments(run, seq, lengths, state, 1)
                outputs.append(out if direction == 0 else reverse_padded(out, lengths))
                finals.append(h_n)
            layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
            if layer < self.num_layers - 1 and self.dropout > 0.0:
                layer_input = nn.functional.dropout(layer_input, self.dropout, self.training)
        return layer_input, tuple(torch.cat(parts, 0) for parts in zip(*finals))

    # -- generic -------------------------------------------------------------------------------
    def _forward_generic(self, x: Tensor, lengths: Tensor | None, state: Sequence[State] | None):
        if lengths is not None and self.padded == "segments":  # measured no faster: not auto's choice
            return self._forward_generic_segments(x, lengths, state)
        steps = x.shape[1]
        masks: list[Tensor | None] = [None] * steps
        device_lengths = None
        if lengths is not None:
            shortest = int(lengths.min())  # a host read: lengths stay on the CPU (see the module doc)
            device_lengths = to_device(lengths, x.device)  # pinned, asynchronous on CUDA
            # Zero the padding first: 0 * NaN is NaN, so garbage there would reach gradients.
            real = torch.arange(steps, device=x.device) < device_lengths.unsqueeze(1)
            x = x.masked_fill(~real.unsqueeze(-1), 0.0)
            # Only steps past the shortest sequence need a masked update; a mask is a view of `real`.
            for t in range(shortest, steps):
                masks[t] = real[:, t : t + 1]
        return self._over_layers(
            x, state, device_lengths, lambda cell, seq, s0: self._run_cell(cell, seq, s0, masks)
        )

    def _forward_generic_segments(self, x: Tensor, lengths: Tensor, state: Sequence[State] | None):
        """A padded batch, layer by layer and direction by direction, in spans of time where no
        sequence ends (``_run_segments``): no padded position computed, no masked update. Only with
        ``padded="segments"``: the generic loop's cost is per step, not per row, so skipping
        finished rows saved nothing at SST-2 and CoNLL-2003 lengths and the extra calls cost."""

        def in_segments(cell: Cell, seq: Tensor, s0: State):
            single = isinstance(s0, Tensor)

            def run(part: Tensor, parts: tuple[Tensor, ...]):
                out, s_n = self._run_cell(cell, part, parts[0] if single else parts, [None] * part.shape[1])
                return out, (s_n,) if single else tuple(s_n)

            out, parts = _run_segments(run, seq, lengths, (s0,) if single else tuple(s0), 0)
            return out, parts[0] if single else parts

        return self._over_layers(x, state, lengths, in_segments)

    def _over_layers(self, x: Tensor, state: Sequence[State] | None, lengths, run_direction):
        """The generic paths' walk: layer by layer, each direction through ``run_direction(cell,
        seq, initial state) -> (outputs, final state)``, the backward one on the sequences reversed
        within their ``lengths``; dropout between layers."""
        batch = x.shape[0]
        layer_input, final = x, []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                cell = self.cells[k]
                s0 = state[k] if state is not None else cell.init_state(batch, device=x.device, dtype=x.dtype)
                seq = layer_input if direction == 0 else reverse_padded(layer_input, lengths)
                out, s_n = run_direction(cell, seq, s0)
                outputs.append(out if direction == 0 else reverse_padded(out, lengths))
                final.append(s_n)
            layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
            if layer < self.num_layers - 1 and self.dropout > 0.0:
                layer_input = nn.functional.dropout(layer_input, self.dropout, self.training)
        return layer_input, final

    def _run_cell(self, cell: Cell, seq: Tensor, s: State, masks: list[Tensor | None]):
        if self.sequence_path:
            out, s = run_sequence(cell, cell.project_input(seq.transpose(0, 1)), s, masks)
            return out.transpose(0, 1), s
        if self._hoists:
            inputs, step = cell.project_input(seq).unbind(1), cell.forward_projected
        else:
            inputs, step = seq.unbind(1), cell
        hs = []
        for x_t, mask in zip(inputs, masks):
            h, new = step(x_t, s)
            if mask is not None:
                new = _map_state(lambda n, o, m=mask: torch.where(m, n, o), new, s)
                h = h * mask
            s = new
            hs.append(h)
        return torch.stack(hs, dim=1), s


def _fused_run(kernel, weights: list[Tensor], layers: int, dropout: float, training: bool):
    """A fused kernel as ``_run_segments`` calls it: (input, state parts) -> (output, parts)."""

    def run(seq: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        hx = state if len(state) > 1 else state[0]
        result = kernel(seq, hx, weights, True, layers, dropout, training, False, True)
        return result[0], tuple(result[1:])

    return run


def _run_segments(
    run, x: Tensor, lengths: Tensor, hx: tuple[Tensor, ...], batch_dim: int
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """A unidirectional recurrence ``run(input, state parts) -> (outputs, state parts)`` over the
    padded batch ``x [B, T, F]`` (CPU ``lengths``), exactly as over each sequence alone: one call
    on full-length rows per span of time in which no sequence ends.

    With the rows in length order the sequences still running in a span are one block of rows
    (the last ones when shortest first, as length-bucketed batches come; the first ones when
    longest first; any other order is sorted, longest first). Each call starts from the state the
    previous span left, and the rows that end with a span keep its final state. A bucketed batch
    holds one to three distinct lengths: one to three calls, with no padded position computed and
    no masking. ``hx``: the state parts, batch along ``batch_dim`` (1 for a fused kernel's
    ``[layers, B, H]``, 0 for a cell's ``[B, H]``); returns outputs ``[B, T, H]`` (zeros at
    padding) and the final parts."""
    batch, steps = x.shape[0], x.shape[1]
    ends = lengths.tolist()
    ascending = all(a <= b for a, b in zip(ends, ends[1:]))
    order = None
    if not ascending and not all(a >= b for a, b in zip(ends, ends[1:])):
        sorted_lengths, order = torch.sort(lengths, descending=True, stable=True)
        ends, device_order = sorted_lengths.tolist(), to_device(order, x.device)
        x = x.index_select(0, device_order)
        hx = tuple(h.index_select(batch_dim, device_order) for h in hx)
    spans = sorted(set(ends))
    running = [sum(1 for end in ends if end >= stop) for stop in spans] + [0]  # rows in each span

    def block(t: Tensor, dim: int, first: int, count: int) -> Tensor:
        """``count`` rows of ``t`` starting ``first`` rows from the start (longest first) or from
        the end of the running block (shortest first)."""
        size = t.shape[dim]
        return t.narrow(dim, first if not ascending else size - first - count, count)

    outputs, finished, start, state = [], [], 0, hx
    for span, stop in enumerate(spans):
        rows, still = running[span], running[span + 1]
        state = tuple(block(part, batch_dim, 0, rows) for part in state)
        out, state = run(block(x, 0, 0, rows).narrow(1, start, stop - start), state)
        if rows < batch:
            out = nn.functional.pad(
                out, (0, 0, 0, 0) + ((0, batch - rows) if not ascending else (batch - rows, 0))
            )
        outputs.append(out)
        finished.append(tuple(block(part, batch_dim, still, rows - still) for part in state))
        start = stop
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    if start < steps:
        out = nn.functional.pad(out, (0, 0, 0, steps - start))
    # the rows that end first were finished first: they lead the batch when it is shortest first
    final = tuple(torch.cat(parts if ascending else parts[::-1], dim=batch_dim) for parts in zip(*finished))
    if order is not None:
        unorder = torch.empty_like(order)
        unorder[order] = torch.arange(batch)
        device_unorder = to_device(unorder, x.device)
        out = out.index_select(0, device_unorder)
        final = tuple(part.index_select(batch_dim, device_unorder) for part in final)
    return out, final


def _run_masked(
    kernel, x: Tensor, lengths: Tensor, real: Tensor, hx: tuple[Tensor], weights: list[Tensor], training: bool
) -> tuple[Tensor, tuple[Tensor]]:
    """One layer and direction of a GRU or tanh RNN ``kernel`` over the whole padded batch in one
    dense call. The steps past a sequence's end only follow it (the recurrence is causal), so its
    real outputs are exact; its final state is its output at its last real step. The padding is
    zeroed first, so the states computed there stay bounded and their gradients, multiplied by
    the zeros the mask sends back, are exactly zero (0 * NaN would not be)."""
    x = x.masked_fill(~real, 0.0)
    out = kernel(x, hx[0], weights, True, 1, 0.0, training, False, True)[0].masked_fill(~real, 0.0)
    rows = torch.arange(x.shape[0], device=x.device)
    last = out[rows, to_device(lengths, x.device) - 1]  # [B, H]
    return out, (last.unsqueeze(0),)


def parameter_counts(encoder: Encoder) -> dict:
    """Total, input-side and recurrent parameter counts, overall and per layer."""
    per_layer = []
    for layer in range(encoder.num_layers):
        inp = rec = 0
        for direction in range(encoder.num_directions):
            cell = encoder.cells[layer * encoder.num_directions + direction]
            input_names = set(cell.input_parameter_names())
            for name, p in cell.named_parameters():
                if name in input_names:
                    inp += p.numel()
                else:
                    rec += p.numel()
        per_layer.append({"layer": layer, "input": inp, "recurrent": rec, "total": inp + rec})
    return {
        "total": sum(p["total"] for p in per_layer),
        "input": sum(p["input"] for p in per_layer),
        "recurrent": sum(p["recurrent"] for p in per_layer),
        "per_layer": per_layer,
    }
