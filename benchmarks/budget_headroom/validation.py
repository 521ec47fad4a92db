"""Validation (570 ARC-Easy items): the chosen routers' configuration (head blocks, target kl, tap 2) retrained on
three bootstrap resamples (train part and dev part resampled, the dev draws are the static-resampled ones), and the
label-free oracle of head sets (the vocabulary set of least actual KL to the full model, per item)."""
import json, random, sys, time
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

R, OUT = Path(sys.argv[1]), Path(sys.argv[2])  # a `drllm train --budget` folder, an output folder
OUT.mkdir(parents=True, exist_ok=True)
KS = [1, 2, 4, 6, 8]
def log(*a): print(time.strftime("%H:%M:%S"), *a, flush=True)
def jl(p): return [json.loads(l) for l in open(p)]
model, tok = load_model(None)
L = model.config.num_hidden_layers
items = load_task("arc_easy", "train", limit=500)
tr_idx, dv_idx = split_dev(len(items), 0.2, 0)
sel = json.loads((R / "selection.json").read_text())
assert sel["dev_ids"] == [items[i].id for i in dv_idx]
vocab = {int(k): v for k, v in sel["vocabulary"].items()}
sets = [s for k in KS for s in vocab[k]]
singles = [[b] for b in range(2, L)]
single = {r["id"]: r for r in jl(R / "damage-single.jsonl")}
dev = {r["id"]: r for r in jl(R / "damage-dev.jsonl")}
devc = [tuple(c) for c in json.loads((R / "damage-dev.jsonl.settings.json").read_text())["candidates"]]
def srec(ex):
    if ex.id in single: return single[ex.id]
    r = dev[ex.id]; w = {c: j for j, c in enumerate(devc)}
    return {k: [r[k][w[tuple(c)]] for c in singles] for k in ("margin", "kl")}
feats = torch.load(OUT / "features.pt")[2]
m_all, v_all = feats["means"], feats["valid"]
r0 = BudgetRouters.for_model(model, tap=2, head="blocks")
dmg = damage_targets([srec(e) for e in items], singles, r0, "kl")
val = load_task("arc_easy", "validation")
vf = tap_features(model, [encode_prompt(tok, cloze_context(e, tok, style="plain"), cloze=True) for e in val], [2])[2]
picks = {}
chosen = BudgetRouters.from_pretrained(R)
with torch.no_grad():
    pr = predict(chosen, *vf)
picks["routers (chosen, dev 100)"] = {k: [path_to_str(p) for p in chosen.pick(pr, k)] for k in KS}
rng = random.Random(0)  # the static-resampled draws: compare.choose_baselines(resamples=3, resample_seed=0)
draws = [rng.choices(list(dv_idx), k=len(dv_idx)) for _ in range(3)]
for r, dv in enumerate(draws):
    tr = random.Random(100 + r).choices(list(tr_idx), k=len(tr_idx))
    torch.manual_seed(0)
    rt = BudgetRouters.for_model(model, tap=2, head="blocks")
    fit_budget_routers(rt, (m_all[tr], v_all[tr], dmg[tr]), (m_all[dv], v_all[dv], dmg[dv]),
                       BudgetConfig(head="blocks", target="kl", epochs=200))
    with torch.no_grad():
        pr = predict(rt, *vf)
    picks[f"routers resample {r}"] = {k: [path_to_str(p) for p in rt.pick(pr, k)] for k in KS}
for target in ("margin", "kl"):  # the static choice of head blocks' kind: least mean damage on the train part
    mean = damage_targets([srec(items[i]) for i in tr_idx], singles, r0, target).mean(0, keepdim=True)
    path = path_to_str(r0.pick(mean, 1)[0])
    picks[f"static blocks (least mean {target}, train part)"] = {k: [path_to_str(r0.pick(mean, k)[0])] * len(val) for k in KS}
log("picks made", {n: {k: v[k][0] for k in KS} for n, v in picks.items() if n.startswith("static")})
set_paths = [skip_set_path(L, s) for s in sets]
scores = PathScores(model, tok, val)
rows = []
t = time.perf_counter()
for i, ex in enumerate(val):
    need = list(dict.fromkeys(["1" * L, *set_paths, *(picks[n][k][i] for n in picks for k in KS)]))
    res = dict(zip(need, scores.evaluator(i).evaluate(need)))
    d = torch.tensor(res["1" * L].scores, dtype=torch.float64).log_softmax(-1)
    def kl(p):
        q = torch.tensor(res[p].scores, dtype=torch.float64).log_softmax(-1)
        return float((d.exp() * (d - q)).sum())
    from drllm.eval.scoring import path_row
    ok = {p: path_row(ex, res[p])["correct"] for p in need}
    row = {"vanilla": ok["1" * L], **{f"{n}|{k}": ok[picks[n][k][i]] for n in picks for k in KS}}
    for k in KS:
        opts = [skip_set_path(L, s) for s in vocab[k]]
        row[f"oracle sets label-free|{k}"] = ok[min(opts, key=kl)]
        row[f"oracle sets answer|{k}"] = int(any(ok[p] for p in opts))
        row[f"static sets (vocabulary's first)|{k}"] = ok[opts[0]]
    rows.append(row)
    scores.evaluators.pop(ex.id, None)
    if i % 50 == 49: log(f"  {i + 1}/{len(val)} items, {time.perf_counter() - t:.0f}s")
(OUT / "val.json").write_text(json.dumps({"rows": rows, "picks": picks}))
n = len(rows)
names = list(dict.fromkeys(k.split("|")[0] for k in rows[0] if "|" in k))
print(f"vanilla {sum(r['vanilla'] for r in rows) / n:.3f} (n={n})")
for nm in names:
    print(f"| {nm} | " + " | ".join(f"{sum(r[f'{nm}|{k}'] for r in rows) / n:.3f}" for k in KS) + " |")
