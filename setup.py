"""Build sparsekern._C from csrc/.

The CPU extension is always built. Hot loops reach AVX2/AVX-512 through GCC
``target_clones`` (see csrc/cpu/common.h), so the default build is portable;
``SPARSEKERN_NATIVE=1`` adds ``-march=native`` for a machine-specific build.
The CUDA extension (csrc/cuda/) is added by ``cuda_sources()`` once it exists.
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def cxx_flags():
    flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    if os.environ.get("SPARSEKERN_NATIVE", "0") == "1":
        flags.append("-march=native")
    return flags


def cuda_sources():
    """CUDA kernels live in csrc/cuda/; none are built yet."""
    return []


def extensions():
    sources = ["csrc/ops.cpp"] + rel("csrc/cpu/*.cpp")
    if cuda_sources():
        raise NotImplementedError("CUDA build: see csrc/cuda/README.md")
    print("sparsekern: building the CPU extension (no CUDA sources yet)"
          + (" with -march=native" if os.environ.get("SPARSEKERN_NATIVE") == "1" else ""))
    return [
        CppExtension(
            "sparsekern._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags()},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
