"""sparsekern: fast unstructured-sparse training for PyTorch."""
from . import ops
from .ops import set_backend
from .sparse_matrix import SparseMatrix
from . import nn

__version__ = "0.1.0"
__all__ = ["SparseMatrix", "ops", "nn", "set_backend", "__version__"]
