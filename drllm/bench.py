"""Runtime performance, measured against the vanilla model in the same run.

Four suites (``drllm bench``, ``benchmarks/bench_runtime.py``):

1. ``routing``: pooling + routers for every block against one vanilla
   prefill of T tokens, and a routed prefill end to end (routers that always
   choose "execute", so the blocks run are the vanilla ones) against it.
2. ``generation``: latency of ``generate`` at batch 1: vanilla against the
   patched model on the all-execute path (pure overhead) and on fixed paths
   skipping k blocks. The all-skip path measures the fixed cost (embeddings,
   final norm, head, sampling loop), giving the ideal time of a path that
   executes ``n`` of ``L`` blocks: ``fixed + n / L * (vanilla - fixed)``.
3. ``throughput``: generated tokens per second against batch size with
   per-row paths drawn to match the paper's statistics
   (:func:`sample_paths`): vanilla, routed, and the bound given by the union
   of (block, pass) pairs some row executes.
4. ``policy``: passes that only some rows take, run by gathering those rows
   against running every row and selecting (``drllm.runtime.executor``'s
   row policy), to place the crossover.
5. ``compile``: compiled routed decoding against the compiled vanilla model
   (:mod:`drllm.bench_compile`).
6. ``kernels``: the row ops' bandwidth against a plain copy of the same bytes
   (:mod:`drllm.bench_kernels`).

:func:`targets` states each goal next to the measured value, so a reader of
the JSON sees at once what was met.

Every figure is a ratio against vanilla timed in the same run; variants are
interleaved (one repeat of each in turn) and medians taken, so a loaded
machine slows them all alike. CUDA is synchronised around every timing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

# Per-block decision statistics of Dr.LLM's routers (arXiv 2510.12773): about
# 85% agreement between rows, 2.3% repeats, 7.6% skips.
PAPER_AGREEMENT = 0.85
PAPER_SKIP = 0.076
PAPER_REPEAT = 0.023

# Random-weight models with published configurations (speed does not depend on the weights).
RANDOM_CONFIGS = {
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                         tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                         tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-5),
    # for tests and smoke runs
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=4096),
}


def random_model(name: str, device="cpu", dtype: torch.dtype | None = None, seed: int = 0):
    """A random-weight Llama with the configuration ``name`` (a key of :data:`RANDOM_CONFIGS`)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name not in RANDOM_CONFIGS:
        raise ValueError(f"unknown random model {name!r}; choose from {', '.join(RANDOM_CONFIGS)}")
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = LlamaConfig(**RANDOM_CONFIGS[name], bos_token_id=None, eos_token_id=None, pad_token_id=0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with device:  # initialise on the target device (an 8B model in fp32 on the host would be 32 GB)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


# --------------------------------------------------------------------------- configuration


@dataclass
class BenchConfig:
    suites: tuple = ("routing", "generation", "throughput", "policy", "compile", "kernels")
    repeats: int = 3
    prefill_lengths: tuple = (128, 512, 2048)
    prompt_length: int = 32
    gen_tokens: tuple = (256, 1000)
    skip_counts: tuple = (3, 5, 8)
    batch_sizes: tuple = (1, 2, 4, 8, 16, 32, 64)
    throughput_tokens: int = 32
    policy_batches: tuple = (4, 16, 64)
    policy_fractions: tuple = (0.25, 0.5, 0.75, 0.9)
    policy_tokens: int = 16
    compile_tokens: int = 64
    compile_mode: str | None = None  # torch.compile mode of suite compile ("reduce-overhead": CUDA graphs)
    warmup: bool = True  # an untimed round of every variant before the timed ones
    seed: int = 0

    @classmethod
    def for_run(cls, quick: bool, device: torch.device, **overrides) -> "BenchConfig":
        cuda = torch.device(device).type == "cuda"
        if quick:
            cfg = cls(repeats=1, prefill_lengths=(128, 512), prompt_length=16, gen_tokens=(4, 8),
                      batch_sizes=(1, 4, 16), throughput_tokens=4, policy_batches=(8, 32),
                      policy_fractions=(0.5, 0.875), policy_tokens=2, compile_tokens=8, warmup=False)
            if cuda:
                cfg = cls(repeats=3, gen_tokens=(64, 128), batch_sizes=(1, 8, 32, 128), throughput_tokens=32,
                          policy_batches=(8, 128), policy_fractions=(0.5, 0.875), compile_tokens=64,
                          compile_mode="reduce-overhead")
        else:
            cfg = cls()
            if cuda:
                cfg = cls(repeats=5, batch_sizes=(1, 2, 4, 8, 16, 32, 64, 128), throughput_tokens=64,
                          policy_batches=(4, 16, 64, 128), policy_fractions=(0.25, 0.5, 0.75, 0.9, 0.97),
                          policy_tokens=32, compile_tokens=128, compile_mode="reduce-overhead")
        for name, value in overrides.items():
            if value is not None:
                setattr(cfg, name, value)
        return cfg


# --------------------------------------------------------------------------- paths


def _solve_copy_rate(agreement: float, probs: list[float]) -> float:
    """Probability ``rho`` that a row copies the batch's consensus decision.

    Each row copies the consensus with probability ``rho`` and otherwise draws
    from ``probs``; the expected pairwise agreement is then
    ``rho^2 + (1 - rho^2) * S`` with ``S = sum(p^2)``.
    """
    s = sum(p * p for p in probs)
    if agreement <= s:
        return 0.0
    return math.sqrt(min(1.0, (agreement - s) / (1 - s)))


def sample_paths(batch: int, num_blocks: int, agreement: float = PAPER_AGREEMENT, skip: float = PAPER_SKIP,
                 repeat: float = PAPER_REPEAT, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[batch, num_blocks]`` paths with the given decision rates and row agreement.

    Every decision is skip / execute / repeat with probabilities
    ``(skip, 1 - skip - repeat, repeat)``; ``agreement`` is the expected
    fraction of pairs of rows taking the same decision at a block. A
    consensus path is drawn from those rates and each row copies each of its
    decisions with a probability chosen to reach ``agreement``, else draws
    it afresh (which keeps the rates). Agreement below the independent
    draw's (``sum(p^2)``, 0.82 for the paper's rates) is not reachable and
    gives independent rows. A row never skips every block.
    """
    probs = [skip, 1.0 - skip - repeat, repeat]
    if min(probs) < 0:
        raise ValueError(f"skip ({skip}) and repeat ({repeat}) rates must be >= 0 and sum to <= 1")
    rho = _solve_copy_rate(agreement, probs)
    p = torch.tensor(probs, dtype=torch.float64)
    consensus = torch.multinomial(p, num_blocks, replacement=True, generator=generator)
    fresh = torch.multinomial(p, batch * num_blocks, replacement=True, generator=generator).view(batch, num_blocks)
    copy = torch.rand(batch, num_blocks, generator=generator, dtype=torch.float64) < rho
    paths = torch.where(copy, consensus.expand(batch, -1), fresh).to(torch.int64)
    dead = paths.sum(1) == 0
    paths[dead, num_blocks // 2] = 1
    return paths


def path_statistics(paths: torch.Tensor) -> dict:
    """Skip and repeat rates, and the mean pairwise agreement between rows per block."""
    paths = torch.as_tensor(paths)
    batch = paths.shape[0]
    stats = {"skip": float((paths == 0).double().mean()), "repeat": float((paths == 2).double().mean())}
    if batch > 1:
        counts = torch.stack([(paths == v).sum(0) for v in range(3)]).double()  # [3, L]
        stats["agreement"] = float(((counts * (counts - 1)).sum(0) / (batch * (batch - 1))).mean())
    else:
        stats["agreement"] = 1.0
    return stats


def union_passes(paths: torch.Tensor) -> int:
    """(block, pass) pairs that at least one row runs: the blocks a batched step must execute."""
    paths = torch.as_tensor(paths)
    return int((paths >= 1).any(0).sum() + (paths == 2).any(0).sum())


def skip_path(num_blocks: int, k: int) -> torch.Tensor:
    """A path skipping ``k`` blocks spread evenly over the middle of the model."""
    path = torch.ones(num_blocks, dtype=torch.int64)
    if k:
        lo, hi = (1, num_blocks - 2) if num_blocks > k + 2 else (0, num_blocks - 1)
        path[torch.linspace(lo, hi, k).round().long()] = 0
    if int((path == 0).sum()) != k:
        raise ValueError(f"cannot skip {k} of {num_blocks} blocks evenly")
    return path


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds taken by ``fn()``, the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved(variants: dict, repeats: int, device: torch.device, warmup: bool = True) -> dict:
    """Median seconds of each variant, timed in turn ``repeats`` times.

    ``variants`` maps a name to a ``setup()`` returning ``(run, teardown)``:
    only ``run()`` is timed. One untimed warm-up round runs first.
    """
    samples = {name: [] for name in variants}
    for r in range(repeats + (1 if warmup else 0)):
        for name, setup in variants.items():
            run, teardown = setup()
            try:
                seconds = timed(run, device)
            finally:
                teardown()
            if r or not warmup:
                samples[name].append(seconds)
    return {name: {"median": statistics.median(s), "all": s} for name, s in samples.items()}


def self_noise(res: dict) -> float:
    """The run's noise: the largest relative gap between the vanilla model and itself over interleaved repeats."""
    return max(abs(a / b - 1) for a, b in zip(res["vanilla (again)"]["all"], res["vanilla"]["all"]))


# --------------------------------------------------------------------------- helpers


def _tokens(model, batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return torch.randint(1, vocab, (batch, length), generator=g).to(model.device)


def _generate(model, ids: torch.Tensor, new_tokens: int):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def _plain(model):
    """Setup of the vanilla model: nothing to patch."""
    import drllm

    if drllm.is_patched(model):
        raise RuntimeError("the benchmarked model must not be patched")
    return model


@contextlib.contextmanager
def _routed(model, paths=None, routers=None):
    """The model patched (with ``routers``), optionally on forced ``paths``, for the duration."""
    import drllm

    drllm.patch(model, routers)
    try:
        with drllm.forced_paths(model, paths) if paths is not None else contextlib.nullcontext():
            yield model
    finally:
        drllm.unpatch(model)


def _variant(fn, ctx_factory=None):
    """A setup for :func:`interleaved`: enter ``ctx_factory()``, time ``fn``, exit."""

    def setup():
        ctx = ctx_factory() if ctx_factory is not None else contextlib.nullcontext()
        ctx.__enter__()
        return fn, lambda: ctx.__exit__(None, None, None)

    return setup


def execute_routers(model):
    """Routers of the model's shape that always choose "execute" (full pooling + MLP cost)."""
    import drllm

    routers = drllm.Routers.for_model(model)
    with torch.no_grad():
        for mlp in routers.mlps:
            mlp.fc2.weight.mul_(1e-3)
            mlp.fc2.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
    return routers


# --------------------------------------------------------------------------- suites


def bench_routing(model, cfg: BenchConfig, log=print) -> list[dict]:
    """Suite 1: routers for every block vs one prefill, and a routed prefill end to end."""
    from .runtime.executor import Pooling, choose

    device = model.device
    routers = execute_routers(model)
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    rows = []
    for T in cfg.prefill_lengths:
        ids = _tokens(model, 1, T, cfg.seed + T)
        hidden = torch.randn(1, T, H, device=device, dtype=model.dtype)
        mask = torch.ones(1, T, dtype=torch.long, device=device)

        def prefill():
            with torch.no_grad():
                model(input_ids=ids, use_cache=True)

        def route_all():  # what the executor runs at the prefill: pooling, router MLP and decision per block
            with torch.no_grad():
                pooling = Pooling(routers, mask)
                for i in range(L):
                    choose(pooling.logits(i, hidden), 0.0)

        res = interleaved({
            "vanilla": _variant(prefill),
            "routers": _variant(route_all),
            "routed": _variant(prefill, lambda: _routed(model, routers=routers)),
        }, cfg.repeats, device, cfg.warmup)
        v = res["vanilla"]["median"]
        row = {"T": T, "prefill_ms": 1e3 * v, "routers_ms": 1e3 * res["routers"]["median"],
               "routers_ratio": res["routers"]["median"] / v, "routed_prefill_ratio": res["routed"]["median"] / v,
               "samples": {k: r["all"] for k, r in res.items()}}
        log(f"  routing T={T}: prefill {row['prefill_ms']:.1f} ms, routers {row['routers_ms']:.2f} ms "
            f"({100 * row['routers_ratio']:.2f}%), routed prefill x{row['routed_prefill_ratio']:.3f}")
        rows.append(row)
    return rows


def bench_generation(model, cfg: BenchConfig, log=print) -> list[dict]:
    """Suite 2: generation latency at batch 1, fixed paths against vanilla and the ideal."""
    device = model.device
    L = model.config.num_hidden_layers
    ids = _tokens(model, 1, cfg.prompt_length, cfg.seed)
    rows = []
    for n in cfg.gen_tokens:
        gen = lambda n=n: _generate(model, ids, n)  # noqa: E731
        variants = {"vanilla": _variant(gen, lambda: contextlib.nullcontext(_plain(model))),
                    "vanilla (again)": _variant(gen, lambda: contextlib.nullcontext(_plain(model))),
                    "all-execute": _variant(gen, lambda: _routed(model))}
        ks = [k for k in cfg.skip_counts if k < L]
        for k in ks:
            variants[f"skip {k}"] = _variant(gen, lambda k=k: _routed(model, skip_path(L, k)))
        variants["all-skip"] = _variant(gen, lambda: _routed(model, torch.zeros(L, dtype=torch.int64)))
        res = interleaved(variants, cfg.repeats, device, cfg.warmup)
        v, fixed = res["vanilla"]["median"], res["all-skip"]["median"]
        noise = self_noise(res)
        for name, k in [("all-execute", 0)] + [(f"skip {k}", k) for k in ks]:
            t = res[name]["median"]
            ideal = (fixed + (L - k) / L * (v - fixed)) / v
            row = {"new_tokens": n, "variant": name, "skipped": k, "blocks": L - k, "ms": 1e3 * t,
                   "vanilla_ms": 1e3 * v, "fixed_ms": 1e3 * fixed, "ratio": t / v, "ideal_ratio": ideal,
                   "of_ideal_speedup": ideal * v / t, "noise": noise, "samples": res[name]["all"]}
            rows.append(row)
            log(f"  generation {n} tokens {name}: x{row['ratio']:.3f} of vanilla ({1e3 * v / n:.1f} ms/token), "
                f"ideal x{ideal:.3f}, {100 * row['of_ideal_speedup']:.1f}% of ideal speedup")
    return rows


def bench_throughput(model, cfg: BenchConfig, log=print) -> list[dict]:
    """Suite 3: tokens/s against batch size, paper-statistics paths, with the union bound."""
    device = model.device
    L = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.throughput_tokens
    rows = []
    for B in cfg.batch_sizes:
        ids = _tokens(model, B, cfg.prompt_length, cfg.seed + B)
        paths = sample_paths(B, L, generator=g)
        gen = lambda ids=ids: _generate(model, ids, n)  # noqa: E731
        res = interleaved({
            "vanilla": _variant(gen, lambda: contextlib.nullcontext(_plain(model))),
            "routed": _variant(gen, lambda paths=paths: _routed(model, paths)),
            "all-skip": _variant(gen, lambda: _routed(model, torch.zeros(L, dtype=torch.int64))),
        }, cfg.repeats, device, cfg.warmup)
        v, r, fixed = (res[k]["median"] for k in ("vanilla", "routed", "all-skip"))
        union = union_passes(paths)
        bound = fixed + union / L * (v - fixed)
        tok = B * n
        row = {"batch": B, "vanilla_tok_s": tok / v, "routed_tok_s": tok / r, "bound_tok_s": tok / bound,
               "routed_vs_vanilla": v / r, "bound_vs_vanilla": v / bound, "union_passes": union,
               "mean_path_length": float(paths.sum(1).double().mean()), "num_blocks": L,
               **{f"paths_{k}": val for k, val in path_statistics(paths).items()},
               "samples": {k: x["all"] for k, x in res.items()}}
        rows.append(row)
        log(f"  throughput B={B}: vanilla {row['vanilla_tok_s']:.1f} tok/s, routed {row['routed_tok_s']:.1f} "
            f"(x{row['routed_vs_vanilla']:.3f}), union bound x{row['bound_vs_vanilla']:.3f} ({union}/{L} passes)")
    return rows


def policy_paths(batch: int, num_blocks: int, fraction: float) -> torch.Tensor:
    """Paths where ``round(fraction * batch)`` rows execute every block and the others skip the even blocks."""
    active = min(batch - 1, max(1, round(fraction * batch)))
    paths = torch.ones(batch, num_blocks, dtype=torch.int64)
    paths[active:, 0::2] = 0
    return paths


def bench_policy(model, cfg: BenchConfig, log=print) -> list[dict]:
    """Suite 4: gather/scatter against run-all-and-select for passes some rows take."""
    from .runtime import executor

    device = model.device
    L = model.config.num_hidden_layers
    n = cfg.policy_tokens
    rows = []

    @contextlib.contextmanager
    def policy(name, paths):
        previous = executor.set_row_policy(name)
        try:
            with _routed(model, paths):
                yield
        finally:
            executor.restore_row_policy(previous)

    for B in cfg.policy_batches:
        ids = _tokens(model, B, cfg.prompt_length, cfg.seed + 7 * B)
        for f in cfg.policy_fractions:
            paths = policy_paths(B, L, f)
            gen = lambda ids=ids: _generate(model, ids, n)  # noqa: E731
            res = interleaved({
                "gather": _variant(gen, lambda paths=paths: policy("gather", paths)),
                "select": _variant(gen, lambda paths=paths: policy("select", paths)),
            }, cfg.repeats, device, cfg.warmup)
            gt, st = res["gather"]["median"], res["select"]["median"]
            partial = len(range(0, L, 2))
            row = {"batch": B, "active_fraction": float((paths[:, 0] >= 1).double().mean()), "partial_blocks": partial,
                   "gather_ms": 1e3 * gt, "select_ms": 1e3 * st, "select_vs_gather": st / gt,
                   "per_pass_us": 1e6 * (st - gt) / (partial * (n + 1)),
                   "samples": {k: x["all"] for k, x in res.items()}}
            rows.append(row)
            log(f"  policy B={B} active={row['active_fraction']:.2f}: select/gather x{row['select_vs_gather']:.3f} "
                f"({row['per_pass_us']:+.1f} us per partial pass)")
    return rows


def crossover(policy_rows: list[dict]) -> dict:
    """Per batch size, the smallest active fraction from which selecting was not slower than gathering."""
    out = {}
    for B in sorted({r["batch"] for r in policy_rows}):
        rows = sorted((r for r in policy_rows if r["batch"] == B), key=lambda r: r["active_fraction"])
        # The crossover: every measured fraction from it upwards favours selecting.
        frac = None
        for r in reversed(rows):
            if r["select_vs_gather"] <= 1.0:
                frac = r["active_fraction"]
            else:
                break
        out[str(B)] = frac
    return out


def bench_compile(model, cfg: BenchConfig, log=print) -> list[dict]:
    """Suite 5 (:mod:`drllm.bench_compile`)."""
    from .bench_compile import bench_compile as suite

    return suite(model, cfg, log=log)


def bench_kernels(model, cfg: BenchConfig, log=print) -> list[dict]:
    """Suite 6 (:mod:`drllm.bench_kernels`)."""
    from .bench_kernels import bench_kernels as suite

    return suite(model, cfg, log=log)


SUITES = {"routing": bench_routing, "generation": bench_generation, "throughput": bench_throughput,
          "policy": bench_policy, "compile": bench_compile, "kernels": bench_kernels}


def run(model, cfg: BenchConfig, log=print, model_name: str | None = None) -> dict:
    """Run the suites of ``cfg`` on ``model`` (unpatched) and return the results as a dict."""
    import drllm

    from .runtime.executor import row_policy

    if drllm.is_patched(model):
        raise ValueError("benchmark an unpatched model: the suites patch and unpatch it themselves")
    device = model.device
    info = {
        "date": _dt.date.today().isoformat(),
        "model": model_name or getattr(model.config, "name_or_path", "") or model.config.model_type,
        "num_blocks": model.config.num_hidden_layers,
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "row_policy": row_policy(),
        "config": asdict(cfg),
    }
    results = {"info": info, "suites": {}}
    total = time.perf_counter()
    if not cfg.warmup:  # one short generation, so the first timed variant does not pay for the first call
        _generate(model, _tokens(model, 1, 8, cfg.seed), 2)
    for name in cfg.suites:
        if name not in SUITES:
            raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
        log(f"[{name}]")
        start = time.perf_counter()
        results["suites"][name] = SUITES[name](model, cfg, log=log)
        results.setdefault("seconds", {})[name] = time.perf_counter() - start
    if "policy" in results["suites"]:
        results["policy_crossover"] = crossover(results["suites"]["policy"])
    from .bench_targets import targets

    results["targets"] = targets(results, device)
    info["seconds"] = time.perf_counter() - total
    return results


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- tables


def tables(results: dict) -> list[tuple[str, list[str], list[list]]]:
    """``(title, headers, rows)`` of each suite's table."""
    out = []
    s = results["suites"]
    if "routing" in s:
        out.append(("routing overhead (batch 1)", ["T", "prefill ms", "routers ms", "routers / prefill",
                                                   "routed prefill / vanilla"],
                    [[r["T"], f"{r['prefill_ms']:.1f}", f"{r['routers_ms']:.2f}", f"{100 * r['routers_ratio']:.2f}%",
                      f"{r['routed_prefill_ratio']:.3f}"] for r in s["routing"]]))
    if "generation" in s:
        out.append(("generation latency (batch 1)", ["new tokens", "path", "blocks", "ms", "vs vanilla",
                                                     "ideal", "of ideal speedup"],
                    [[r["new_tokens"], r["variant"], f"{r['blocks']}", f"{r['ms']:.0f}", f"{r['ratio']:.3f}",
                      f"{r['ideal_ratio']:.3f}", f"{100 * r['of_ideal_speedup']:.1f}%"] for r in s["generation"]]))
    if "throughput" in s:
        out.append(("throughput (paper path statistics)", ["batch", "vanilla tok/s", "routed tok/s", "union bound tok/s",
                                                          "routed / vanilla", "bound / vanilla", "union passes",
                                                          "agreement", "skip", "repeat"],
                    [[r["batch"], f"{r['vanilla_tok_s']:.1f}", f"{r['routed_tok_s']:.1f}", f"{r['bound_tok_s']:.1f}",
                      f"{r['routed_vs_vanilla']:.3f}", f"{r['bound_vs_vanilla']:.3f}",
                      f"{r['union_passes']}/{r['num_blocks']}", f"{r['paths_agreement']:.2f}",
                      f"{100 * r['paths_skip']:.1f}%", f"{100 * r['paths_repeat']:.1f}%"] for r in s["throughput"]]))
    if "policy" in s:
        out.append(("gather/scatter vs run-all-and-select", ["batch", "active rows", "gather ms", "select ms",
                                                             "select / gather", "us per partial pass"],
                    [[r["batch"], f"{r['active_fraction']:.2f}", f"{r['gather_ms']:.0f}", f"{r['select_ms']:.0f}",
                      f"{r['select_vs_gather']:.3f}", f"{r['per_pass_us']:+.1f}"] for r in s["policy"]]))
    if "compile" in s:
        rows = [r for r in s["compile"] if r["variant"] != "summary"]
        summary = next(r for r in s["compile"] if r["variant"] == "summary")
        out.append((f"compiled decoding (batch 1, static cache, {summary['new_tokens']} tokens; noise "
                    f"{100 * summary['noise']:.1f}%, {summary['graphs_compiled']} graphs, "
                    f"{summary['graphs_after_warmup']} after the first round)",
                    ["path", "blocks", "ms", "vs compiled vanilla", "ideal", "of ideal speedup", "compile s"],
                    [[r["variant"], r["blocks"], f"{r['ms']:.0f}", f"{r['ratio']:.3f}", f"{r['ideal_ratio']:.3f}",
                      f"{100 * r['of_ideal_speedup']:.1f}%", f"{r['compile_s']:.1f}"] for r in rows]))
    if "kernels" in s:
        out.append(("kernels against a copy of the same bytes", ["op", "backend", "dtype", "GB/s", "copy GB/s",
                                                                "share of copy", "us per op"],
                    [[r["op"], r["backend"], r["dtype"], f"{r['GB_s']:.1f}", f"{r['copy_GB_s']:.1f}",
                      f"{100 * r['share_of_copy']:.0f}%", f"{r['us_per_op']:.1f}"] for r in s["kernels"]]))
    if results.get("targets"):
        out.append(("targets", ["goal", "value", "target", "met"],
                    [[name, f"{t['value']:.3f}", f"{t['op']} {t['target']:.3f}", "yes" if t["met"] else "NO"]
                     for name, t in results["targets"].items()]))
    return out
