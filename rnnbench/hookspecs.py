"""Every hook a plugin can implement. This module is the one place a plugin author reads.

A plugin is a module (or any object) with functions decorated by ``rnnbench.hookimpl`` whose
names match the specs below. Builtin cells and tasks are plugins too: they register through the
same hooks. Third-party plugins are found through entry points of group ``rnnbench``::

    [project.entry-points.rnnbench]
    mycell = "my_pkg.plugin"

Set ``RNNBENCH_DISABLE_PLUGINS=1`` to load builtins only (to debug a broken installation).
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("rnnbench")


@hookspec
def rnnbench_cells() -> dict[str, type]:
    """Return ``{name: CellClass}`` for the recurrent cells this plugin provides.

    Each class subclasses :class:`rnnbench.Cell`: an ``nn.Module`` built as
    ``Cell(input_size, hidden_size, **hparams)``, with ``init_state(batch_size, *, device, dtype)``
    and ``forward(x_t, state) -> (h_t, new_state)`` for one time step (``x_t``: ``[batch, input]``,
    ``h_t``: ``[batch, hidden]``; ``state`` a tensor or a tuple of tensors whose first dimension is
    the batch). Optionally ``project_input``/``forward_projected`` let the encoder hoist the input
    projection out of the time loop (see :class:`rnnbench.Cell`). A cell may call
    ``super().__init__()`` bare and build its own layers, as PyTorch modules do; its hyperparameters
    are its keyword arguments after the sizes, their values declared in ``hparam_domains``.
    ``rnnbench check`` tests a cell against all of this.

    Names are global: two plugins returning the same name is an error naming both. The class
    docstring's first line is the description ``rnnbench list`` shows. Stacking, bidirectional
    reading and padding are the encoder's job; a cell only does one step.
    """


@hookspec
def rnnbench_tasks() -> dict[str, type]:
    """Return ``{name: TaskClass}`` for the tasks this plugin provides.

    Each class subclasses :class:`rnnbench.Task`; see its docstring for the contract: the datasets
    it knows, its options, the input layer and head it builds around an encoder, its loss, its
    metrics (primary first, each with its direction), whether it is causal and its trivial baseline.
    """
