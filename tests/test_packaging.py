"""The source distribution holds what an install from it compiles and imports: every C++/CUDA source and
header, every module of the packages, the tests. Without MANIFEST.in setuptools puts in only the .cpp files
the building machine's extension lists, so `pip install sparsekern-*.tar.gz` failed on the first #include."""
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what setup.py reads, compiles or packages (pyproject's package-dir maps triton_kernels/ and bench/ into sparsekern)
NEEDED = ("csrc/", "sparsekern/", "triton_kernels/", "bench/", "tests/")
NEEDED_FILES = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md")


def _tracked() -> list:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the tracked files are the reference)")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def test_sdist_holds_every_source_and_module(tmp_path):
    tracked = _tracked()
    src = tmp_path / "src"
    for name in tracked:  # a copy of the tracked tree: no build output or egg-info of the checkout leaks in
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                   capture_output=True, text=True, check=True, timeout=300)
    (archive,) = (tmp_path / "dist").glob("sparsekern-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = [f for f in tracked if f.startswith(NEEDED) or f in NEEDED_FILES]
    assert any(f.startswith("csrc/cpu/") and f.endswith(".h") for f in needed)  # the headers are what was lost
    assert any(f.startswith("csrc/cuda/") and f.endswith(".cu") for f in needed)
    missing = sorted(set(needed) - names)
    assert not missing, f"the sdist lacks {len(missing)} file(s) an install needs: {missing[:20]}"
