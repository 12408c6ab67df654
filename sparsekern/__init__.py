"""sparsekern: fast unstructured-sparse training for PyTorch."""
from . import ops
from .ops import backend, set_backend
from .sparse_matrix import SparseMatrix
from .block_sparse import BlockSparseMatrix
from . import nn
from . import init, sparsity, dst, train
from .sparsity import densify, sparsify
from .nn.kernel_choice import explain

__version__ = "0.1.0"
__all__ = ["SparseMatrix", "BlockSparseMatrix", "ops", "nn", "backend", "set_backend", "__version__", "sparsify", "explain", "sparsity", "init", "dst", "train"]
