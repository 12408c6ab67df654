"""The CUDA kernels' logic, checked on the host without a GPU (needs only g++).

* ``host_test.cpp``: the tiling arithmetic that csrc/cuda/tiling.h shares between the kernels and host
  code (row swizzle buckets, panel row dealing and shared-memory swizzle, SpMM path choice, SDDMM tile
  order, the conv index maps, the top-k output plan and bucket search) against brute force.
* ``sim_test.cpp``: every kernel file of csrc/cuda compiled as C++ against the SIMT emulator
  (simt/simt.h: threads as fibers, real barriers and warp shuffles) and run through the same launch
  functions the torch launcher calls, against naive double-precision references, under three thread
  schedules (a missing barrier shows up as a wrong result under one of them); and the device-side
  index checks, which must stop the kernel.
"""
import concurrent.futures
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler (g++) to build the host tests")

FLAGS = ["-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-I", str(ROOT / "csrc")]
SIM_FLAGS = FLAGS + ["-DSK_SIMT", "-I", str(HERE / "simt")]


def _run(cmd, timeout=600):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _check_build(proc, what):
    assert proc.returncode == 0, f"{what} failed to compile:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def host_test(tmp_path_factory):
    exe = tmp_path_factory.mktemp("host") / "host_test"
    _check_build(_run([CXX, *FLAGS, str(HERE / "host_test.cpp"), "-o", str(exe)]), "host_test.cpp")
    return exe


@pytest.fixture(scope="module")
def sim_test(tmp_path_factory):
    """The emulator build: each .cu as C++ (-x c++ -DSK_SIMT), in parallel, linked with sim_test.cpp."""
    out = tmp_path_factory.mktemp("simt")
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + [HERE / "sim_test.cpp"]
    jobs = []
    for src in sources:
        obj = out / (src.stem + ".o")
        lang = ["-x", "c++"] if src.suffix == ".cu" else []
        jobs.append(([CXX, *SIM_FLAGS, *lang, "-c", str(src), "-o", str(obj)], src.name, obj))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        procs = list(pool.map(lambda j: _run(j[0]), jobs))
    for proc, (_, name, _) in zip(procs, jobs):
        _check_build(proc, f"{name} (SIMT build)")
    exe = out / "sim_test"
    _check_build(_run([CXX, *[str(j[2]) for j in jobs], "-o", str(exe)]), "sim_test (link)")
    return exe


def _assert_all_passed(proc):
    failures = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0 and not failures, (
        f"exit {proc.returncode}\n" + "\n".join(failures[:30]) + f"\n{proc.stderr[-3000:]}\n{proc.stdout[-500:]}")
    assert proc.stdout.rstrip().endswith("0 failed")


def test_tiling_logic(host_test):
    _assert_all_passed(_run([str(host_test)]))


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle"])
@pytest.mark.parametrize("group", ["spmm", "sddmm", "conv", "topk", "gather"])
def test_kernels_in_simt_emulator(sim_test, group, order):
    _assert_all_passed(_run([str(sim_test), group, order]))


@pytest.mark.parametrize("case,message", [("trap_col", "invalid col_idx"), ("trap_gather", "is out of range")])
def test_device_checks_stop_the_kernel(sim_test, case, message):
    proc = _run([str(sim_test), case])
    assert proc.returncode != 0, "the kernel did not stop on an invalid index"
    assert message in proc.stdout and "__trap" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SPARSEKERN_SANITIZERS") != "1",
                    reason="opt-in (about 90 s on 2 cores): set SPARSEKERN_SANITIZERS=1")
def test_kernels_under_sanitizers(tmp_path):
    """The emulator build again under AddressSanitizer and UBSan: an out-of-bounds access of the
    (host-allocated) device buffers, of shared memory or of a kernel's locals fails here."""
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-g"]
    probe = subprocess.run([CXX, *san, "-x", "c++", "-", "-o", str(tmp_path / "probe")],
                           input="int main() { return 0; }", capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"{CXX} cannot build with sanitizers: {probe.stderr[-300:]}")
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + [HERE / "sim_test.cpp"]
    jobs = [([CXX, *SIM_FLAGS, *san, *(["-x", "c++"] if s.suffix == ".cu" else []), "-c", str(s), "-o",
              str(tmp_path / (s.stem + ".o"))], s.name) for s in sources]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        procs = list(pool.map(lambda j: _run(j[0]), jobs))
    for proc, (_, name) in zip(procs, jobs):
        _check_build(proc, f"{name} (sanitizer build)")
    exe = tmp_path / "sim_test_san"
    _check_build(_run([CXX, *san, *[str(tmp_path / (s.stem + ".o")) for s in sources], "-o", str(exe)]), "link")
    env = dict(os.environ, ASAN_OPTIONS="detect_stack_use_after_return=0:detect_leaks=0")
    for group in ("spmm", "sddmm", "conv", "topk", "gather"):
        proc = subprocess.run([str(exe), group], capture_output=True, text=True, timeout=1800, env=env)
        _assert_all_passed(proc)
