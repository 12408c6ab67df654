"""Benchmarks (installed as ``sparsekern.bench``), run by ``sparsekern bench``."""
