"""Triton kernels (installed as ``sparsekern.triton_kernels``), one file per op; see the Triton issue."""
