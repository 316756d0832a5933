"""Build moelora_ext._C against the installed torch.

CPU-only (csrc/*.cpp, csrc/cpu/*.cpp) unless torch has CUDA and nvcc is found, or MOELORA_FORCE_CUDA=1:
then csrc/cuda/*.cu are compiled too, with CUTLASS headers from $CUTLASS_DIR or the installed
`nvidia-cutlass` wheel. Environment knobs: MOELORA_CPU_ONLY=1, MOELORA_FORCE_CUDA=1, MOELORA_CUDA_ARCHS (nvcc -gencode flags),
CUTLASS_DIR, MAX_JOBS (parallel compile jobs, read by torch's BuildExtension).

Install with `pip install --no-build-isolation .` (or `-e .`): the build needs the torch you run with.
"""
import glob
import os
import shutil
import site
import sys
import warnings
from pathlib import Path

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent.resolve()
DEFAULT_CUDA_ARCHS = "-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a"


def sources(pattern):
    """Paths relative to setup.py (setuptools wants relative paths), sorted for reproducible builds."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / pattern)))


def nvcc_path():
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def want_cuda():
    if os.environ.get("MOELORA_CPU_ONLY", "0") == "1":
        return False
    if os.environ.get("MOELORA_FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and nvcc_path() is not None


def find_cutlass():
    """CUTLASS source dir (holds include/cutlass/cutlass.h): $CUTLASS_DIR, else the nvidia-cutlass wheel,
    located through its file list (its Python modules are never imported), else None."""
    def ok(path):
        return path is not None and (Path(path) / "include" / "cutlass" / "cutlass.h").is_file()

    env = os.environ.get("CUTLASS_DIR")
    if env:
        if ok(env):
            return str(Path(env).resolve())
        warnings.warn(f"CUTLASS_DIR={env} has no include/cutlass/cutlass.h; looking for the nvidia-cutlass wheel")
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        try:
            candidate = distribution("nvidia-cutlass").locate_file("cutlass_library/source")
            if ok(candidate):
                return str(Path(candidate).resolve())
        except PackageNotFoundError:
            pass
    except ImportError:
        pass
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    for d in dirs:
        candidate = Path(d) / "cutlass_library" / "source"
        if ok(candidate):
            return str(candidate.resolve())
    return None


def make_extension():
    cxx_flags = ["-O3"]
    cpp_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    if not want_cuda():
        return CppExtension("moelora_ext._C", cpp_sources, extra_compile_args={"cxx": cxx_flags})

    archs = os.environ.get("MOELORA_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).split()
    nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "--expt-extended-lambda", "-lineinfo"] + archs
    defines = ["-DMOELORA_WITH_CUDA"]
    include_dirs = []
    cutlass = find_cutlass()
    if cutlass is None:
        warnings.warn("CUTLASS not found (set CUTLASS_DIR or pip install nvidia-cutlass); "
                      "building without the sm90 CUTLASS expert GEMM (MOELORA_NO_CUTLASS)")
        defines.append("-DMOELORA_NO_CUTLASS")
    else:
        print(f"moelora_ext: CUTLASS from {cutlass}")
        include_dirs += [os.path.join(cutlass, "include"), os.path.join(cutlass, "tools", "util", "include")]
        defines.append("-DCUTLASS_ENABLE_TENSOR_CORE_MMA=1")
    return CUDAExtension(
        "moelora_ext._C",
        cpp_sources + sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu"),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags + defines},
    )


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
