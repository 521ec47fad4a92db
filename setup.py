"""Build script.

The Python package is ``drllm`` plus ``drllm.kernels`` (Triton kernels, kept
in ``kernels/`` at the repository root). The PyTorch extension ``drllm._C``
(``csrc/``) is compiled against the torch already installed, so build with

    pip install --no-build-isolation -e .

CPU kernels are always built; the CUDA kernels when torch has CUDA and nvcc is
found. ``DRLLM_NO_EXT=1`` skips the extension (drllm then uses its PyTorch
reference ops).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def extensions():
    """``(ext_modules, cmdclass)`` for drllm._C, or nothing when it is skipped."""
    if _flag("DRLLM_NO_EXT"):
        print("drllm: DRLLM_NO_EXT set, skipping the C++/CUDA extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "drllm: torch is not importable in the build environment, skipping the extension "
            "(build with --no-build-isolation)",
            file=sys.stderr,
        )
        return [], {}

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = rel("csrc/*.cpp")
    debug = _flag("DRLLM_DEBUG_EXT")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP region: compile it with OpenMP. The
        # runtime (libgomp) comes with libtorch, so it is not linked here.
        cxx.append("-fopenmp")
    extra = {"cxx": cxx}
    use_cuda = torch.cuda.is_available() or (CUDA_HOME is not None and torch.version.cuda is not None)
    if use_cuda:
        sources += rel("csrc/cuda/*.cu")
        extra["nvcc"] = ["-O3", "-lineinfo"] if not debug else ["-O0", "-g", "-G"]
        ext = CUDAExtension("drllm._C", sources, extra_compile_args=extra)
    else:
        ext = CppExtension("drllm._C", sources, extra_compile_args=extra)
    print(f"drllm: building drllm._C ({'CPU + CUDA' if use_cuda else 'CPU'})", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["drllm", "drllm.*"]) + ["drllm.kernels"],
    package_dir={"drllm.kernels": "kernels"},
    # the ARC items the demo needs (drllm.tasks.data.EMBEDDED), so it runs offline from a wheel too
    package_data={"drllm.tasks": ["embedded/*/*.jsonl", "embedded/README.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
