"""Build sparsekern._C from csrc/.

The CPU extension is always built. Hot loops are built for x86-64-v4 (AVX-512), v3 (AVX2) and baseline
and picked per call (``SK_CLONED``, see csrc/cpu/common.h), so the default build is portable;
``SPARSEKERN_NATIVE=1`` adds ``-march=native`` for a machine-specific build;
``SPARSEKERN_SANITIZE=1`` builds the C++ code with AddressSanitizer and UndefinedBehaviorSanitizer
(``make sanitize``: it then needs libasan and libubsan preloaded into Python).
The C++ sources are every csrc/cpu/*.cpp (one file per op, and the CSR engine's files) and csrc/ops.cpp.
The CUDA kernels (csrc/cuda/) are compiled into the same module when torch was built
with CUDA and nvcc is found (CUDA_HOME); ``TORCH_CUDA_ARCH_LIST`` picks the GPU
architectures (default "8.0;9.0+PTX": PTX of the newest listed arch lets newer GPUs JIT the kernels).
Otherwise the CPU extension alone is built.
"""
import glob
import os
import re
import shutil
import sys
import sysconfig

import torch
from setuptools import setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# torch >= 2.14 headers need C++20 (std::bit_width); gcc >= 10 and nvcc >= 12 take it on torch 2.11-2.13 too.
CXX_STD = "c++20"
# The GPU architectures by default: cubins for sm_80 and sm_90, plus PTX of sm_90 so newer GPUs can JIT it.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# SPARSEKERN_SANITIZE=1: ASan + UBSan on the C++ code (compile and link); the CUDA device code is untouched.
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]


def sanitize():
    return os.environ.get("SPARSEKERN_SANITIZE", "0") == "1"


def cxx_flags():
    flags = ["-O3", f"-std={CXX_STD}", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    if os.environ.get("SPARSEKERN_NATIVE", "0") == "1":
        flags.append("-march=native")
    if sanitize():
        flags += SANITIZE_FLAGS
    return flags


def cuda_sources():
    """The CUDA kernels (torch-free .cu files) and their launcher (csrc/cuda/launch.cpp)."""
    return rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")


def _is_toolkit(path):
    return bool(path) and all(os.path.exists(os.path.join(path, *p)) for p in
                              (("bin", "nvcc"), ("include", "cuda_runtime.h")))


def find_cuda_home():
    """A CUDA toolkit with nvcc and headers. torch guesses CUDA_HOME from `which nvcc`, which is wrong
    when nvcc on PATH is a wrapper script (e.g. /usr/local/bin/nvcc): follow it to a real toolkit."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                  "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        with open(nvcc, "rb") as f:  # a shell wrapper names the real nvcc
            head = f.read(4096)
        if head.startswith(b"#!"):
            candidates += [os.path.dirname(os.path.dirname(w.decode())) for w in re.findall(rb"(/\S+)/nvcc\b", head)]
    return next((c for c in candidates if _is_toolkit(c)), None)


def cuda_build_reason():
    """None when the CUDA extension can be built, else why not (for the build message)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return "no CUDA toolkit with nvcc and cuda_runtime.h found (set CUDA_HOME)"
    cpp_extension.CUDA_HOME = cuda_home  # what CUDAExtension's include and library paths use
    if not cuda_sources():
        return "no CUDA sources"
    return None


def nvcc_flags():
    # The .cu files include no torch header: these are all the flags they need. No fast-math: the
    # kernels must match the fp32 reference to 1e-4.
    return ["-O3", "-lineinfo", f"-std={CXX_STD}"]


def extensions():
    sources = ["csrc/ops.cpp"] + rel("csrc/cpu/*.cpp")
    native = " with -march=native" if os.environ.get("SPARSEKERN_NATIVE") == "1" else ""
    native += " with ASan+UBSan (SPARSEKERN_SANITIZE=1)" if sanitize() else ""
    why_not = cuda_build_reason()
    link_args = ["-fopenmp"] + (SANITIZE_FLAGS if sanitize() else [])
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=link_args)
    if why_not is not None:
        print(f"sparsekern: building the CPU extension only ({why_not}){native}")
        return [CppExtension("sparsekern._C", sources, extra_compile_args={"cxx": cxx_flags()}, **common)]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    print(f"sparsekern: building the CPU and CUDA extension (CUDA {torch.version.cuda}, {cpp_extension.CUDA_HOME}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}){native}")
    return [
        cpp_extension.CUDAExtension(
            "sparsekern._C",
            sources + cuda_sources(),
            extra_compile_args={"cxx": cxx_flags(), "nvcc": nvcc_flags()},
            **common,
        )
    ]


class BuildInTree(BuildExtension):
    """Objects in the tree's build/ whichever command builds (an editable install would use a fresh temporary
    directory each time): ninja then rebuilds only what changed, and a compiler cache (sccache, see the Makefile),
    which keys a ``-g`` compile on its working directory, finds them again from another clone of the tree."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildInTree.with_options(use_ninja=True)},
)
