"""The GPU code compiles for real NVIDIA targets, checked on machines without a GPU.

Neither the Triton kernel (``kernels/``) nor the CUDA extension source
(``csrc/cuda/rows.cu``) can run here, and the CPU tests reach neither compiler:
the Triton tests use the interpreter and ``setup.py`` builds ``rows.cu`` only
when torch has CUDA. These tests run the real compilers, so that a change
breaking the GPU build fails on a CPU-only machine too:

* Triton: ahead-of-time compile (``triton.compile`` for a ``GPUTarget``, which
  needs no driver) of the exact launches the launcher makes, through PTX and
  ptxas to a cubin, for sm_80 and sm_90. ptxas's report must show no spills
  (``CompiledKernel.n_regs``/``n_spills`` are only filled in when the cubin is
  loaded on a GPU, so the counts come from ``ptxas -v``).
* nvcc: ``rows.cu`` to an object for sm_90 with the flags torch's
  ``BuildExtension`` passes; skipped when no nvcc is found.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
DTYPES = ("float32", "bfloat16", "float16")
HIDDEN = (576, 4096)  # SmolLM2-135M, Llama-class 7B/8B


# --------------------------------------------------------------------- Triton


def _triton_launches() -> list[dict]:
    """Every kernel launch ``pooled_router_logits_triton`` makes for CUDA inputs.

    The launcher runs as it would on a GPU (``interpreting()`` False, fake CUDA
    tensors that need no device), but the kernels are swapped for recorders, so
    its block sizes, ``DOT_F32`` and ``num_warps`` choices are what gets compiled.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from drllm.kernels import _triton_pooled_router as source
    from drllm.kernels import pooled_router

    launches: list[dict] = []
    label: dict = {}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(dict(label, kernel=self.kernel, args=args, kwargs=kwargs))

    recorders = tuple(map(Recorder, source._kernels(False)))
    source._kernels = lambda interpret: recorders
    pooled_router._launcher = lambda kernel, interpret: kernel
    pooled_router.interpreting = lambda: False
    B, T, nw = 2, 100, 8
    for dtype in DTYPES:
        for H in HIDDEN:
            label = dict(dtype=dtype, H=H)
            with FakeTensorMode():
                cuda = dict(device="cuda")
                pooled_router.pooled_router_logits_triton(
                    torch.empty(B, T, H, dtype=getattr(torch, dtype), **cuda),
                    torch.ones(B, T, dtype=torch.long, **cuda),  # an HF attention mask
                    nw,
                    torch.empty(128, H, **cuda), torch.empty(128, **cuda),
                    torch.empty(3, 128, **cuda), torch.empty(3, **cuda),
                )  # fmt: skip
    # Triton specialises on pointer alignment, which fake tensors lack: CPU stand-ins
    # of the same dtype, 16-byte aligned like CUDA allocations.
    for launch in launches:
        launch["args"] = [torch.empty(16, dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in launch["args"]]
    return launches


def _triton_compile_all(report_path: str) -> None:
    """Compile every launch for each arch; write names, sizes and ptxas's counts as JSON.

    Runs in a fresh process without ``TRITON_INTERPRET``: once triton has been
    imported in interpreter mode its own library functions are interpreted ones
    and the compiler rejects them. Argument binding and specialisation go
    through the same steps as ``JITFunction.run`` (triton is pinned to 3.8.0).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v output (registers, spills)
    report: dict[tuple, dict] = {}
    for launch in _triton_launches():
        jit = launch["kernel"]
        name = jit.fn.__name__
        for arch in ARCHS:
            target = GPUTarget("cuda", arch, 32)
            backend = make_backend(target)
            bind = create_function_from_signature(jit.signature, jit.params, backend)
            bound, specialization, options = bind(*launch["args"], **launch["kwargs"])
            options, signature, constexprs, attrs = jit._pack_args(
                backend, launch["kwargs"], bound, specialization, options
            )
            # One compile per distinct code shape: H = 576 and 4096 differ only in a
            # divisibility hint on the scalar S, and _router_head not in the dtype.
            key = (name, arch, str(signature), str(constexprs), str(options))
            if key in report:
                report[key]["launches"].append([launch["dtype"], launch["H"]])
                continue
            source = ASTSource(jit, signature, constexprs, attrs)
            with contextlib.redirect_stdout(io.StringIO()) as log:
                compiled = triton.compile(source, target=target, options=options.__dict__)
            ptx = compiled.asm.get("ptx", "")
            regs = re.search(r"Used (\d+) registers", log.getvalue())
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
            report[key] = dict(
                kernel=name, arch=arch, dtype=launch["dtype"], launches=[[launch["dtype"], launch["H"]]],
                constexprs={jit.arg_names[path[0]]: v for path, v in constexprs.items()},
                num_warps=compiled.metadata.num_warps, shared=compiled.metadata.shared,
                ptx_entry=f".entry {name}(" in ptx,
                ptx_target=(re.findall(r"^\.target (\S+)", ptx, re.M) or [""])[0],
                cubin_bytes=len(compiled.asm.get("cubin", b"")),
                regs=int(regs.group(1)) if regs else None,
                spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else None,
            )  # fmt: skip
    Path(report_path).write_text(json.dumps(list(report.values()), indent=1))


@pytest.fixture(scope="module")
def triton_report(tmp_path_factory) -> list[dict]:
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("triton_aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # a cold cache: ptxas really runs
    cmd = [sys.executable, __file__, "triton", str(tmp / "report.json")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-8000:]
    return json.loads((tmp / "report.json").read_text())


def test_triton_compiles_every_launch(triton_report):
    """Both kernels, both archs, every (dtype, H), with the launcher's GPU defaults."""
    every = {(d, h) for d in DTYPES for h in HIDDEN}
    for kernel in ("_pool_linear1", "_router_head"):
        for arch in ARCHS:
            rows = [r for r in triton_report if r["kernel"] == kernel and r["arch"] == arch]
            assert {tuple(x) for r in rows for x in r["launches"]} == every, (kernel, arch)
    for r in triton_report:
        if r["kernel"] == "_pool_linear1":
            c = r["constexprs"]
            assert (c["BLOCK_T"], c["BLOCK_H"], c["BLOCK_D"], c["NWP"]) == (32, 64, 128, 16), r
            assert c["DOT_F32"] == (r["dtype"] == "float32"), r  # tensor cores for bf16/fp16
        assert r["num_warps"] == 4, r


@pytest.mark.parametrize("arch", ARCHS)
def test_triton_cubin_without_spills(triton_report, arch):
    """PTX for the arch, a cubin from ptxas, no register spills, shared memory that fits."""
    rows = [r for r in triton_report if r["arch"] == arch]
    print(f"sm_{arch}:")  # shown with -s / -rA
    for r in rows:
        dtypes = "/".join(sorted({d for d, _ in r["launches"]}))
        print(f"  {r['kernel']:14} {dtypes:26} regs={r['regs']:<4} spills={r['spill_bytes']}B smem={r['shared']}B")
        assert r["ptx_entry"] and r["ptx_target"].startswith(f"sm_{arch}"), r  # sm_90a on Hopper
        assert r["cubin_bytes"] > 0, r
        assert r["regs"] is not None and 0 < r["regs"] <= 255, r
        assert r["spill_bytes"] == 0, r
        assert r["shared"] <= 99 * 1024, r  # below sm_80's and sm_90's opt-in limit per block


# ----------------------------------------------------------------------- nvcc


def _find_nvcc() -> str | None:
    """nvcc under $CUDA_HOME/$CUDA_PATH, on PATH (torch's order), or from the ``nvidia-cuda-nvcc`` wheel.

    The CUDA 13 wheels (nvidia-cuda-nvcc, -nvvm, -crt, -runtime, -cccl) install a
    complete toolkit tree at ``site-packages/nvidia/cu13``; the CUDA 12 wheel
    ships ptxas only, no nvcc.
    """
    found = [str(Path(os.environ[v]) / "bin" / "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    found += [shutil.which("nvcc")]
    found += [str(Path(p) / "nvidia" / "cu13" / "bin" / "nvcc") for p in sys.path if p]
    return next((p for p in found if p and os.access(p, os.X_OK)), None)


def _nvcc_command(nvcc: str, out: Path, arch: int) -> list[str]:
    """The nvcc command torch's BuildExtension runs for setup.py's ``CUDAExtension``.

    torch 2.13 compiles extensions as C++20 and adds ``COMMON_NVCC_FLAGS`` (the
    ``__CUDA_NO_HALF_OPERATORS__`` family, ``--expt-relaxed-constexpr``), -fPIC,
    ``-DTORCH_API_INCLUDE_EXTENSION_H`` and ``-DTORCH_EXTENSION_NAME``; setup.py
    adds -O3 -lineinfo. The CPU torch wheel ships c10/cuda headers without the
    generated ``cuda_cmake_macros.h`` (on Linux it only defines a Windows export
    switch), so it is skipped with ``C10_CUDA_NO_CMAKE_CONFIGURE_FILE``.
    """
    import torch
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    includes = include_paths() + [sysconfig.get_paths()["include"]]
    torch_include = Path(torch.__file__).parent / "include"
    no_macros = not (torch_include / "c10/cuda/impl/cuda_cmake_macros.h").exists()
    return [
        nvcc, *(f"-I{p}" for p in includes), "-c", str(ROOT / "csrc/cuda/rows.cu"), "-o", str(out),
        *(["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"] if no_macros else []),
        *COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC", "-O3", "-lineinfo",
        "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
        f"-gencode=arch=compute_{arch},code=sm_{arch}", "-std=c++20", "-Xcompiler", "-Wall",
    ]  # fmt: skip


def test_rows_cu_compiles_with_nvcc(tmp_path):
    """rows.cu builds for sm_90 with no warning in drllm's own sources (about a minute: torch's headers)."""
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc (PATH, CUDA_HOME, or `pip install nvidia-cuda-nvcc nvidia-cuda-cccl`)")
    out = tmp_path / "rows.o"
    cmd = _nvcc_command(nvcc, out, 90)
    print(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.splitlines()[-2:])
    print(" ".join(cmd))  # shown with -s / -rA
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, " ".join(cmd) + "\n" + r.stdout[-4000:] + r.stderr[-8000:]
    assert out.stat().st_size > 0
    assert b"sm_90" in out.read_bytes()  # the embedded cubin's arch
    warning = re.compile(r"rows\.(cu|h)(:\d+:\d+: |\(\d+\): )warning")  # gcc's and cudafe's formats
    ours = [line for line in (r.stdout + r.stderr).splitlines() if warning.search(line)]
    assert not ours, "warnings in drllm's sources:\n" + "\n".join(ours)


if __name__ == "__main__" and sys.argv[1:2] == ["triton"]:
    _triton_compile_all(sys.argv[2])
