"""IndRNN for rnnbench (Li et al. 2018, "Independently Recurrent Neural Network")."""

from rnnbench_indrnn.cell import IndRNNCell

__version__ = "0.1.0"
__all__ = ["IndRNNCell", "__version__"]
