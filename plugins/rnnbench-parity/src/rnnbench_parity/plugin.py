"""The module the entry point names: rnnbench registers every hook function it finds here."""

from rnnbench import hookimpl
from rnnbench_parity.task import ParityTask


@hookimpl
def rnnbench_tasks():
    return {"parity": ParityTask}
