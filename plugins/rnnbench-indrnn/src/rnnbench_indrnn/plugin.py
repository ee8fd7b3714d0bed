"""The module the entry point names: rnnbench registers every hook function it finds here."""

from rnnbench import hookimpl
from rnnbench_indrnn.cell import IndRNNCell


@hookimpl
def rnnbench_cells():
    return {"indrnn": IndRNNCell}
