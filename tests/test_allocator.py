"""sparsekern.keep_freed_memory: glibc keeps a step's freed buffers for reuse instead of page-faulting them in again."""
import platform
import subprocess
import sys

import pytest

from sparsekern import allocator
from sparsekern.cli import build_parser

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Five allocations of one 40 MB tensor, each written whole and freed, after four that grow the heap: 40 MB is
# above the largest threshold glibc adapts to (32 MB), so by default every one comes from new pages.
_FAULTS = """
import resource, sys
import torch
import sparsekern
kept = sparsekern.keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):  # the first ones place the blocks in the heap (glibc may alternate between two of them)
    t = torch.empty(10 << 20)
    t.fill_(1.0)
    del t
before = faults()
for _ in range(5):
    t = torch.empty(10 << 20)
    t.fill_(1.0)
    del t
print(kept, faults() - before)
"""


def _faults(mode: str):
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    kept, faults_kept = _faults("keep")
    assert kept
    pages = 5 * (40 << 20) // 4096
    assert faults_kept < pages // 100, f"{faults_kept} page faults for five reused 40 MB buffers"
    default, faults_default = _faults("default")
    assert not default
    assert faults_default > faults_kept  # by default each buffer is new pages (fewer faults with huge pages)


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_kept", False)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() is False
    assert allocator._kept is False
    assert "default" in allocator.describe()


def test_describe_names_the_settings(monkeypatch):
    monkeypatch.setattr(allocator, "_kept", True)
    assert allocator.keep_freed_memory() is True  # idempotent: nothing is called again
    assert "1024 MiB" in allocator.describe() and "no trimming" in allocator.describe()


@pytest.mark.parametrize("argv", [["bench", "--default-malloc"], ["train", "--default-malloc"]])
def test_cli_can_leave_malloc_alone(argv):
    args = build_parser().parse_args(argv)
    assert args.default_malloc is True
    assert build_parser().parse_args(argv[:1]).default_malloc is False
