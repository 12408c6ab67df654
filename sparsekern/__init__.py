"""sparsekern: fast unstructured-sparse training for PyTorch."""
from . import distributed, dst, init, nn, ops, sparsity, train
from .allocator import keep_freed_memory
from .block_sparse import BlockSparseMatrix
from .nn.fast_modules import fast_modules, plain_modules
from .nn.fuse import fuse_activations, unfuse_activations
from .nn.kernel_choice import explain
from .ops import backend, set_backend
from .sparse_matrix import SparseMatrix
from .sparsity import densify, sparsify

__version__ = "0.1.0"
__all__ = ["SparseMatrix", "BlockSparseMatrix", "ops", "nn", "backend", "set_backend", "__version__", "sparsify",
           "densify", "explain", "fuse_activations", "unfuse_activations", "sparsity", "init", "dst", "train",
           "keep_freed_memory", "distributed", "fast_modules", "plain_modules"]
