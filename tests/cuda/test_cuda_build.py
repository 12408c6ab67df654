"""Compile-checks csrc/cuda without a GPU: every kernel file with nvcc for sm_80 and sm_90 (warnings
are errors, torch's half/bfloat16 defines set as in the real build), and the torch launcher
(launch.cpp) with g++ -fsyntax-only against torch's and CUDA's headers. Run where nvcc is on PATH
(CI has it); skipped otherwise. The jobs run in parallel, longest first.
"""
import ast
import concurrent.futures
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = [pytest.mark.cuda_build,
              pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA compile check needs the CUDA "
                                                      "toolkit (no GPU)")]

ARCHS = ("80", "90")
KERNEL_FILES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
# As torch's CUDAExtension compiles .cu files (no fp16/bf16 operator overloads or implicit conversions).
TORCH_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                 "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
NVCC_FLAGS = ["-std=c++20", "-O3", "-I", str(ROOT / "csrc"), "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror",
              *TORCH_DEFINES]
# Rough compile cost of each job, so the pool starts the long ones first.
COST = {"sparse_conv2d.cu": 12, "spmm.cu": 10, "sddmm.cu": 8, "launch.cpp": 8, "topk_select.cu": 4}


def _cuda_include():
    """CUDA's include directory: CUDA_HOME / CUDA_PATH, next to nvcc's bin/, or /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  str(Path(os.path.realpath(NVCC)).parent.parent), "/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").exists():
            return Path(c) / "include"
    return Path(candidates[2]) / "include"


def _launcher_cmd(tmp):
    """g++ -fsyntax-only of launch.cpp against torch's headers, or the reason it cannot run."""
    if CXX is None:
        return None, "no g++"
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return None, "torch is not installed"
    incs = [Path(p) for p in include_paths()]
    torch_inc = incs[0]
    if not (torch_inc / "c10" / "cuda" / "CUDAStream.h").exists():
        return None, f"torch's headers ({torch_inc}) have no c10/cuda"
    cuda_inc = _cuda_include()
    if not (cuda_inc / "cuda_runtime_api.h").exists():
        return None, f"no cuda_runtime_api.h in {cuda_inc}"
    stub = []
    if not (torch_inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        # A CPU wheel ships c10/cuda without this one generated header (CUDA builds: the define below).
        d = tmp / "stub" / "c10" / "cuda" / "impl"
        d.mkdir(parents=True, exist_ok=True)
        (d / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        stub = ["-I", str(tmp / "stub")]
    inc = [f for p in incs for f in ("-I", str(p))]
    cmd = [CXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", "-Wno-unknown-pragmas",
           *stub, "-I", str(ROOT / "csrc"), *inc, "-I", str(cuda_inc), str(CUDA_DIR / "launch.cpp")]
    return cmd, None


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nvcc")
    jobs = {}
    for name in KERNEL_FILES:
        for arch in ARCHS:
            jobs[(name, arch)] = [NVCC, *NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c",
                                  str(CUDA_DIR / name), "-o", str(tmp / f"{Path(name).stem}_sm{arch}.o")]
    launcher, why = _launcher_cmd(tmp)
    if launcher is not None:
        jobs[("launch.cpp", "host")] = launcher
    order = sorted(jobs, key=lambda key: -COST.get(key[0], 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {key: pool.submit(subprocess.run, jobs[key], capture_output=True, text=True, timeout=900)
                   for key in order}
        results = {key: f.result() for key, f in futures.items()}
    results["launcher_skip"] = why
    return results


def _assert_ok(proc, what):
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"


@pytest.mark.parametrize("name", KERNEL_FILES)
def test_kernel_file_compiles(builds, name):
    for arch in ARCHS:
        _assert_ok(builds[(name, arch)], f"nvcc {name} for sm_{arch}")


def test_launcher_compiles_against_torch_headers(builds):
    if builds["launcher_skip"] is not None:
        pytest.skip(f"launch.cpp syntax check: {builds['launcher_skip']}")
    _assert_ok(builds[("launch.cpp", "host")], "g++ -fsyntax-only launch.cpp")


def test_kernel_files_are_torch_free():
    """The .cu files must not include torch (one .cu with torch headers takes minutes to compile)."""
    for path in CUDA_DIR.glob("*.cu*"):
        text = path.read_text()
        for banned in ("torch/", "ATen/", "c10/"):
            included = f"#include <{banned}" in text or f'#include "{banned}' in text
            assert not included, f"{path.name} includes {banned}"


def test_setup_builds_every_kernel_file():
    """setup.py's cuda_sources() picks up every .cu file and the launcher by glob."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "cuda_sources")
    src = ast.get_source_segment((ROOT / "setup.py").read_text(), fn)
    assert 'rel("csrc/cuda/*.cu")' in src and 'rel("csrc/cuda/*.cpp")' in src
