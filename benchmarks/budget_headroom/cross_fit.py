"""Cross-fitted headroom on the 500 embedded ARC-Easy train items: routers of each head/target/tap against the
static choice of the same kind, the label-free oracle (least actual KL) and the answer oracle. 5 folds; every
number is on items the routers (and the static choice) never saw."""
import json, os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from drllm.models import load_model
from drllm.tasks import load_task
from drllm.train import split_dev, tap_features, damage_targets, fit_budget_routers, predict, BudgetConfig
from drllm.routing import BudgetRouters
from drllm.eval.budget import PathScores
from drllm.tasks import encode_prompt
from drllm.tasks.prompts import cloze_context
from drllm.paths import path_to_str, skip_set_path
from drllm.eval.stats import paired_test

R, OUT = Path(sys.argv[1]), Path(sys.argv[2])  # a `drllm train --budget` folder, an output folder
OUT.mkdir(parents=True, exist_ok=True)
KS = [1, 2, 4, 6, 8]; TAPS = [2, 8]; FOLDS = 5
def log(*a): print(time.strftime("%H:%M:%S"), *a, flush=True)
def jl(p): return [json.loads(l) for l in open(p)]
model, tok = load_model(None)
L = model.config.num_hidden_layers
items = load_task("arc_easy", "train", limit=500)
sel = json.loads((R / "selection.json").read_text())
vocab = {int(k): v for k, v in sel["vocabulary"].items()}
sets = [s for k in KS for s in vocab[k]]
singles = [[b] for b in range(2, L)]
single = {r["id"]: r for r in jl(R / "damage-single.jsonl")}
voc = {r["id"]: r for r in jl(R / "damage-vocabulary.jsonl")}
dev = {r["id"]: r for r in jl(R / "damage-dev.jsonl")}
devc = json.loads((R / "damage-dev.jsonl.settings.json").read_text())["candidates"]
def rec(ex, cands):
    """One record with the given candidates' margin/kl/correct, from whichever file holds the item."""
    if ex.id in dev:
        r, have = dev[ex.id], devc
    else:
        r, have = (single[ex.id], singles) if cands is singles else (voc[ex.id], sets)
    where = {tuple(c): j for j, c in enumerate(have)}
    return {k: [r[k][where[tuple(c)]] for c in cands] for k in ("margin", "kl", "correct")} | {"id": ex.id,
            "default_correct": r["default_correct"]}
S = [rec(e, singles) for e in items]; V = [rec(e, sets) for e in items]
ff = OUT / "features.pt"
if not ff.exists():
    t = time.perf_counter()
    f = tap_features(model, [encode_prompt(tok, cloze_context(e, tok, style="plain"), cloze=True) for e in items], TAPS)
    torch.save({t_: {"means": m, "valid": v} for t_, (m, v) in f.items()}, ff)
    log(f"features {time.perf_counter() - t:.0f}s")
feats = {t: (d["means"], d["valid"]) for t, d in torch.load(ff).items()}
n = len(items)
perm = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
fold_of = [0] * n
for j, i in enumerate(perm): fold_of[i] = j % FOLDS
picks = {}  # name -> K -> [path str per item]
def put(name, k, i, p): picks.setdefault(name, {}).setdefault(k, [None] * n)[i] = p
for fold in range(FOLDS):
    test = [i for i in range(n) if fold_of[i] == fold]
    rest = [i for i in range(n) if fold_of[i] != fold]
    tr_local, dv_local = split_dev(len(rest), 0.2, 0)
    tr, dv = [rest[j] for j in tr_local], [rest[j] for j in dv_local]
    for head in ("blocks", "sets"):
        recs = S if head == "blocks" else V
        cands = singles if head == "blocks" else sets
        for tap in TAPS:
            if head == "sets" and tap > 2: continue
            for target in ("margin", "kl"):
                torch.manual_seed(0)
                r = BudgetRouters.for_model(model, tap=tap, head=head, sets=vocab if head == "sets" else None)
                dmg = damage_targets(recs, cands, r, target)
                m, v = feats[tap]
                fit_budget_routers(r, (m[tr], v[tr], dmg[tr]), (m[dv], v[dv], dmg[dv]),
                                   BudgetConfig(head=head, target=target, epochs=200))
                with torch.no_grad():
                    pr = predict(r, m[test], v[test])
                for k in KS:
                    for i, p in zip(test, r.pick(pr, k)): put(f"routers {head}/{target} tap {tap}", k, i, path_to_str(p))
        # same-kind static and the two oracles (tap 2 candidates)
        r = BudgetRouters.for_model(model, tap=2, head=head, sets=vocab if head == "sets" else None)
        for target in ("margin", "kl"):
            dmg = damage_targets(recs, cands, r, target)
            mean = dmg[rest].mean(0, keepdim=True)
            for k in KS:
                p = path_to_str(r.pick(mean, k)[0])
                for i in test: put(f"static {head} (least mean {target})", k, i, p)
                for i, p in zip(test, r.pick(dmg[test], k)):
                    put(f"oracle {head} ({'answer' if target == 'margin' else 'label-free: least KL'})", k, i, path_to_str(p))
    log(f"fold {fold} fitted")
scores = PathScores(model, tok, items)
need = [sorted({picks[nm][k][i] for nm in picks for k in KS} | {"1" * L}) for i in range(n)]
log(f"scoring {sum(map(len, need))} paths on {n} items")
t = time.perf_counter()
res = {}
for i in range(n):
    c = scores.correct([need[i]], [i])[0]
    res[i] = dict(zip(need[i], c))
    scores.evaluators.pop(items[i].id, None)
    if i % 50 == 49: log(f"  {i + 1}/{n} items, {time.perf_counter() - t:.0f}s")
out = {"vanilla": [res[i]["1" * L] for i in range(n)], "methods": {nm: {str(k): [res[i][picks[nm][k][i]] for i in range(n)]
       for k in KS} for nm in picks}, "picks": picks, "folds": FOLDS}
(OUT / "xfit.json").write_text(json.dumps(out))
van = out["vanilla"]
print(f"vanilla {sum(van) / n:.3f} (n={n})")
print("| method | " + " | ".join(f"K={k}" for k in KS) + " |")
for nm, by in out["methods"].items():
    print(f"| {nm} | " + " | ".join(f"{sum(by[str(k)]) / n:.3f}" for k in KS) + " |")
