"""What sparse attention costs in quality on a real model (docs/QUALITY.md).

For each document: the first `n_ctx` tokens become a context (exported from
the model into a database); the next `n_cont` tokens are a real continuation.
Every configuration (dense, budgets, calibrated thresholds; flat and
hierarchical) is scored by

* teacher-forced perplexity of the continuation, each continuation token
  selecting its own clusters (per-query selection, as in decoding), against
  the model's own perplexity on the full sequence;
* greedy answers to questions about the document, compared token by token
  with the dense answer;
* the fraction of the context's clustered keys read;

and `sqctl eval` runs on the same context with the continuation's real
queries (recall of attention mass against the oracle, per head kind).

    python -m squeeze.quality --model smollm2 --out quality.json [--sqctl build/tools/sqctl]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import squeeze
from squeeze import hf

QUESTIONS = {
    "GPL-3": ["Which version of the GNU General Public License is this?",
              "Who is allowed to copy and distribute this license document?",
              "What does the word 'Program' refer to in this license?"],
    "GFDL-1.3": ["What is the name of this license?",
                 "What is a 'Secondary Section' according to this license?",
                 "Which organisation published this license?"],
    "argparse.py": ["What does this Python module do?",
                    "Which class is used to create a command-line parser in this module?",
                    "Who wrote this module?"],
}


def default_documents() -> dict[str, str]:
    """Real documents nobody here wrote: two license texts from Debian's
    base-files and a long standard-library module of the running Python."""
    import argparse as ap
    return {"GPL-3": "/usr/share/common-licenses/GPL-3", "GFDL-1.3": "/usr/share/common-licenses/GFDL-1.3",
            "argparse.py": ap.__file__}


def configs() -> list[dict]:
    out = [{"label": "dense", "mode": "dense"}]
    for hier in (False, True):
        tag = "hier" if hier else "flat"
        for b in (0.125, 0.25):
            out.append({"label": f"budget 1/{round(1 / b)} {tag}", "mode": "budget", "budget": b,
                        "hierarchical": hier})
        for qt in (0.8, 0.9):
            out.append({"label": f"threshold q={qt} {tag}", "mode": "threshold", "threshold_quantile": qt,
                        "hierarchical": hier})
    out.append({"label": "budget 1/8 flat, layer 0 dense", "mode": "budget", "budget": 0.125, "dense_layers": [0]})
    return out


def _nll(logits: torch.Tensor, targets: list[int]) -> float:
    return torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(targets[1:])).item()


@torch.no_grad()
def evaluate_document(model, tok, name: str, path: str, db: squeeze.DB, *, n_ctx: int, n_cont: int,
                      answer_tokens: int, sqctl: str | None, work: str, plot_dir: str | None = None,
                      only: list[str] | None = None) -> dict:
    ids = hf.tokenize_document(tok, open(path, encoding="utf-8", errors="replace").read())
    if len(ids) < n_ctx + n_cont:
        raise squeeze.InvalidArgumentError(f"{path}: {len(ids)} tokens, need {n_ctx + n_cont}")
    ctx_ids, cont = ids[:n_ctx], ids[n_ctx:n_ctx + n_cont]
    t0 = time.perf_counter()
    hf.export_context(model, tok, token_ids=ctx_ids, db=db, name=name, chunk_size=512)
    t_export = time.perf_counter() - t0
    full = model(input_ids=torch.tensor([ctx_ids + cont])).logits[0, n_ctx:]
    res: dict = {"document": name, "path": path, "n_ctx": n_ctx, "n_cont": n_cont, "seconds_export": t_export,
                 "model_ppl": float(torch.exp(torch.tensor(_nll(full, cont)))), "configs": []}
    questions = [tok(f"\n\nQuestion: {q}\nAnswer:", add_special_tokens=False, return_tensors="pt")["input_ids"]
                 for q in QUESTIONS.get(name, [])]
    dense_answers = None
    with db.context(name) as ctx:
        for c in configs():
            if only and c["label"] not in only and c["mode"] != "dense":
                continue
            opts = {k: v for k, v in c.items() if k != "label"}
            t = time.perf_counter()
            logits, cache = hf.own_logits(model, ctx, torch.tensor(cont), tokenizer=tok, per_query_selection=True,
                                          **opts)
            row = {**c, "ppl": float(torch.exp(torch.tensor(_nll(logits, cont)))),
                   "max_logit_diff_vs_model": (logits - full).abs().max().item(),
                   "fraction_read": cache.fraction_read, "seconds_ppl": time.perf_counter() - t}
            answers = []
            for q in questions:
                new, _ = hf.generate(model, ctx, q, tokenizer=tok, max_new_tokens=answer_tokens, query=opts)
                answers.append(new[0].tolist())
            if c["mode"] == "dense":
                dense_answers = answers
            agree = [_common_prefix(a, d) / max(1, len(d)) for a, d in zip(answers, dense_answers or [])]
            row["answers"] = [tok.decode(a, skip_special_tokens=True) for a in answers]
            row["answer_prefix_agreement"] = agree
            res["configs"].append(row)
            print(f"  {name:12s} {c['label']:24s} ppl {row['ppl']:7.3f} read {100 * row['fraction_read']:5.1f}% "
                  f"answers agree {[round(x, 2) for x in agree]}", file=sys.stderr)
    model.set_attn_implementation("sdpa")
    if sqctl:
        res["sqctl_eval"] = run_sqctl_eval(model, ids[:n_ctx + n_cont], n_ctx, db, name, sqctl, work, plot_dir)
    return res


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run_sqctl_eval(model, ids: list[int], n_ctx: int, db: squeeze.DB, name: str, sqctl: str, work: str,
                   plot_dir: str | None = None) -> dict:
    """`sqctl eval` with the continuation's real post-RoPE queries (and its
    recall plot in plot_dir)."""
    layers, _ = hf.compute_kv(model, ids, window=len(ids) - n_ctx, chunk_size=512)
    qfile = os.path.join(work, f"{name}.queries.safetensors")
    from safetensors.torch import save_file
    save_file({f"layers.{i}.q": q.contiguous() for i, (_, _, q) in enumerate(layers)}, qfile)
    out = subprocess.run([sqctl, "eval", "--db", db.path, "--context", name, "--queries", qfile, "--budgets",
                          "0.05,0.125,0.25", "--json"], check=True, capture_output=True, text=True).stdout
    rep = json.loads(out)
    if plot_dir:
        os.makedirs(plot_dir, exist_ok=True)
        with open(os.path.join(plot_dir, f"eval-{name}.json"), "w") as f:
            f.write(out)  # the full report: recall and oracle per (layer, query head) and configuration
        from squeeze.plot import plot_eval
        plot_eval(rep, os.path.join(plot_dir, f"recall-{name}.png"),
                  f"{name}: SmolLM2-135M, {n_ctx}-token context, queries of the next {len(ids) - n_ctx} tokens")
    per_layer = {}
    for i, h in enumerate(rep["heads"]):
        for c in rep["configs"]:
            if c["name"] in ("budget=0.125 flat", "budget=0.125 hier"):
                per_layer.setdefault(c["name"], {}).setdefault(h["layer"], []).append(
                    (c["head_recall"][i], c["head_oracle"][i]))
    keep = ("recall_mean", "recall_worst", "oracle_mean", "recall_over_oracle", "error_mean", "keys_fraction")
    return {"heads_concentrated": rep["heads_concentrated"], "heads_spread": rep["heads_spread"],
            "configs": [{"name": c["name"], "read_fraction": c["read_fraction"],
                         **{kind: {k: c[kind][k] for k in keep} for kind in ("all", "concentrated", "spread")}}
                        for c in rep["configs"]],
            "per_layer_budget_0.125": {cfg: {str(layer): {"recall": sum(r for r, _ in v) / len(v),
                                                          "oracle": sum(o for _, o in v) / len(v),
                                                          "worst_head_recall": min(r for r, _ in v)}
                                             for layer, v in layers_.items()}
                                       for cfg, layers_ in per_layer.items()}}


def markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(f"\n### {r['document']} ({r['n_ctx']} context tokens, {r['n_cont']} continuation tokens; "
                     f"the model's own perplexity {r['model_ppl']:.3f})\n")
        lines.append("| configuration | perplexity | vs model | context keys read | answers agreeing with dense "
                     "(prefix share) |")
        lines.append("| --- | --- | --- | --- | --- |")
        for c in r["configs"]:
            agree = ", ".join(f"{x:.2f}" for x in c["answer_prefix_agreement"])
            lines.append(f"| {c['label']} | {c['ppl']:.3f} | {100 * (c['ppl'] / r['model_ppl'] - 1):+.1f}% | "
                         f"{100 * c['fraction_read']:.1f}% | {agree} |")
        if "sqctl_eval" in r:
            e = r["sqctl_eval"]
            lines.append(f"\n`sqctl eval` with the continuation's queries ({e['heads_concentrated']} concentrated, "
                         f"{e['heads_spread']} spread query heads):\n")
            lines.append("| configuration | KV read | recall (all) | oracle (all) | recall concentrated | "
                         "recall spread | output error |")
            lines.append("| --- | --- | --- | --- | --- | --- | --- |")
            for c in e["configs"]:
                lines.append(f"| {c['name']} | {100 * c['read_fraction']:.1f}% | {c['all']['recall_mean']:.3f} | "
                             f"{c['all']['oracle_mean']:.3f} | {c['concentrated']['recall_mean']:.3f} | "
                             f"{c['spread']['recall_mean']:.3f} | {c['all']['error_mean']:.3f} |")
            for cfg, per in e.get("per_layer_budget_0.125", {}).items():
                rows = sorted(((v["recall"], int(k), v) for k, v in per.items()))
                med = rows[len(rows) // 2][0]
                worst = ", ".join(f"layer {k} {r:.3f} (oracle {v['oracle']:.3f}, worst head {v['worst_head_recall']:.3f})"
                                  for r, k, v in rows[:3])
                lines.append(f"\nPer layer, {cfg}: recall median {med:.3f}, best {rows[-1][0]:.3f} (layer "
                             f"{rows[-1][1]}); lowest: {worst}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m squeeze.quality", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--n-cont", type=int, default=256)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--documents", nargs="*", help="NAME=PATH pairs (default: GPL-3, GFDL-1.3, argparse.py)")
    p.add_argument("--only", nargs="*", help="evaluate only the configurations with these labels")
    p.add_argument("--sqctl", help="sqctl binary for the recall evaluation (skipped when absent)")
    p.add_argument("--out", required=True, help="JSON results; a Markdown table is printed")
    p.add_argument("--markdown-only", action="store_true", help="print the tables of an existing --out file")
    p.add_argument("--plot-dir", help="write sqctl eval's recall plot of each document here")
    a = p.parse_args(argv)
    if a.markdown_only:
        print(markdown(json.load(open(a.out))["results"]))
        return 0
    docs = dict(d.split("=", 1) for d in a.documents) if a.documents else default_documents()
    model, tok = hf.load_model(a.model)
    results = []
    with tempfile.TemporaryDirectory() as work:
        with squeeze.open(os.path.join(work, "db")) as db:
            for name, path in docs.items():
                results.append(evaluate_document(model, tok, name, path, db, n_ctx=a.n_ctx, n_cont=a.n_cont,
                                                 answer_tokens=a.answer_tokens, sqctl=a.sqctl, work=work,
                                                 plot_dir=a.plot_dir, only=a.only))
    with open(a.out, "w") as f:
        json.dump({"model": a.model, "torch": torch.__version__, "results": results}, f, indent=1)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
