"""
eval_math500.py: MATH-500 accuracy of an LL, with or without an HL's context (experiments 2-5 at test time).

    python eval_math500.py --model runs/exp5/ckpt/ll --hl-model runs/exp5/ckpt/hl --data ../shared/data/math500.jsonl
    python eval_math500.py --model Qwen2.5-0.5B                  # MATH-500 from the hub (HuggingFaceH4/MATH-500)
    python eval_math500.py --model smollm2 --data ../shared/data/math500.jsonl --limit 50 --samples 4 --temperature 1
    python eval_math500.py --report runs/*                       # one markdown table of the runs

Greedy by default; --samples K scores K sampled answers per problem (mean accuracy). With --hl-model each
problem first gets one greedy context from the HL; an HL output that does not parse means no context
(hl_generator rule 1) and is counted in the parse rate. Prints the accuracy with a 95% interval, per level
and per subject, and writes every problem, HL output, context, response, extracted answer and verdict to --out.

The interval: with one answer per problem, the Wilson score interval of the binomial (it stays honest at
0 and 1, where the plain normal interval collapses to a point); with K > 1 answers, a normal interval over
the per-problem mean accuracies (answers to one problem are correlated, so they are not n*K trials).
"""
import glob
import json
import math
import os
import sys
import textwrap
import time
from dataclasses import dataclass, field

import torch

import grpo
from grpo import arg, encode, format_context, format_prompt, generate, stream_seed
from hl_generator import generate_contexts, parse_context
from math_reward import extract_boxed, reward


def wilson_interval(k, n, z=1.96):
    """95% Wilson score interval for k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(scores, samples):
    """(mean, low, high) of per-problem scores (each the mean over its `samples` answers). With several answers
    per problem: the normal interval over the problems' scores (one problem's answers are not independent
    trials), widened to Wilson's over all n * samples answers where that is wider: when every answer is wrong
    (or every one right) the normal interval has no width, and [0, 0] would claim a certainty no run has."""
    n = len(scores)
    mean = sum(scores) / max(n, 1)
    if samples == 1:
        return (mean, *wilson_interval(round(sum(scores)), n))
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(n - 1, 1))
    half = 1.96 * sd / math.sqrt(max(n, 1))
    low, high = wilson_interval(round(sum(scores) * samples), n * samples)
    return mean, max(0.0, min(mean - half, low)), min(1.0, max(mean + half, high))


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # Student t_{0.975, df}, df 1-10


def t975(df):
    """The 97.5% quantile of Student's t with df degrees of freedom: the table above, and beyond df = 10 its
    Cornish-Fisher expansion around the normal's 1.96 (within 0.003 of the exact value there)."""
    z = 1.959964
    return T975[df - 1] if df <= 10 else z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def seeds_interval(accs):
    """95% interval of the mean accuracy over seeds, t-based over the seeds' accuracies (mean +- t * sd / sqrt(n)),
    clipped to [0, 1]: the seed-to-seed uncertainty the interval over problems leaves out. None for one seed."""
    n = len(accs)
    if n < 2:
        return None
    mean = sum(accs) / n
    half = t975(n - 1) * math.sqrt(sum((a - mean) ** 2 for a in accs) / (n - 1) / n)
    return max(0.0, mean - half), min(1.0, mean + half)


@torch.no_grad()
def evaluate(ll_model, tokenizer, problems, eos, hl_model=None, samples=1, temperature=0.0, max_new_tokens=512,
             max_context_tokens=384, batch_size=16, seed=0, out_file=None, log=print, self_threshold=0.9,
             contexts=None):
    """Score the LL on problems: with contexts from hl_model (greedy) when given, else with the given
    contexts (one (x', y') or None per problem: retrieved neighbours), else with none. Returns the summary
    dict; writes one JSON line per problem to out_file when given. Beside each verdict, the leakage: whether
    the HL's output restated x (`ctx_self`: dropped, no context) and whether the context the LL saw carries
    x's own answer in its box (`ctx_has_answer`): a right answer there may be a copy."""
    if samples > 1 and temperature == 0:
        raise SystemExit("--samples K > 1 needs --temperature > 0 (greedy answers would all be the same)")
    source = "hl" if hl_model is not None else "retrieved" if contexts is not None else "none"
    records, t0 = [], time.time()
    # under torchrun each rank scores its share of the problems, and the records are gathered in order
    problems, contexts = grpo.my_share(problems), grpo.my_share(contexts or [None] * len(problems))
    for start in range(0, len(problems), batch_size):
        batch = problems[start:start + batch_size]
        ctxs, hl_texts = contexts[start:start + batch_size], [None] * len(batch)
        if hl_model is not None:
            ctx, _, hl_out, _ = generate_contexts(hl_model, tokenizer, batch, 1, max_context_tokens, 0.0, eos,
                                                  self_threshold=self_threshold)
            ctxs, hl_texts = [c[0] for c in ctx], tokenizer.batch_decode(hl_out, skip_special_tokens=True)
        prompts = [encode(tokenizer, format_prompt(tokenizer, p["problem"], c)) for p, c in zip(batch, ctxs)]
        rows = [p for p in prompts for _ in range(samples)]
        answers, _ = generate(ll_model, rows, max_new_tokens, temperature, 1.0, eos,
                              seed=stream_seed(seed, "eval", start))
        texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
        for i, (p, c, hl_text) in enumerate(zip(batch, ctxs, hl_texts)):
            responses = texts[i * samples:(i + 1) * samples]
            verdicts = [reward(r, p["answer"]) for r in responses]
            restated = c is None and hl_text is not None and parse_context(hl_text) is not None
            records.append({"unique_id": p.get("unique_id"), "level": p.get("level"), "subject": p.get("subject"),
                            "problem": p["problem"], "answer": p["answer"],
                            "hl_output": hl_text, "context": format_context(c) if c else None,
                            "context_parsed": c is not None or restated, "ctx_self": restated,
                            "ctx_has_answer": grpo.carries_answer(c, p["answer"]),
                            "responses": responses, "extracted": [extract_boxed(r) for r in responses],
                            "verdicts": verdicts, "score": sum(verdicts) / samples})
        done = len(records)
        left = (time.time() - t0) / done * (len(problems) - done)
        acc = sum(r["score"] for r in records) / done
        log(f"eval {done}/{len(problems)} | acc so far {acc:.3f} | ~{left:.0f}s left")
    records = grpo.gather(records)
    if out_file and grpo.rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
        with open(out_file, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return summarize(records, samples, source, time.time() - t0)


def summarize(records, samples, source, seconds):
    """Accuracy with its interval, per level and subject; with an HL (source "hl"), its parse rate and how
    often it restated x; with any context, how often the context carried x's answer (None where not)."""
    mean, low, high = accuracy_interval([r["score"] for r in records], samples)
    summary = {"acc": mean, "ci_low": low, "ci_high": high, "n": len(records), "samples": samples, "seconds": seconds,
               "context": source, "by_level": {}, "by_subject": {}}
    for key, name in (("context_parsed", "parse_rate"), ("ctx_self", "ctx_self"), ("ctx_has_answer", "ctx_has_answer")):
        shown = source == "hl" or (source == "retrieved" and key == "ctx_has_answer")
        summary[name] = sum(r[key] for r in records) / max(len(records), 1) if shown else None
    for key, table in (("level", "by_level"), ("subject", "by_subject")):
        groups = {}
        for r in records:
            groups.setdefault(str(r.get(key)), []).append(r["score"])
        summary[table] = {g: {"acc": sum(s) / len(s), "n": len(s)} for g, s in sorted(groups.items())}
    return summary


def print_summary(s, log=print):
    per = f" x {s['samples']} samples" if s["samples"] > 1 else ""
    hl = (f"  | HL contexts: parse rate {s['parse_rate']:.2f}, restated x {s['ctx_self']:.2f}, carried the answer "
          f"{s['ctx_has_answer']:.2f}" if s["parse_rate"] is not None else
          f"  | retrieved contexts carried the answer {s['ctx_has_answer']:.2f}" if s.get("ctx_has_answer") is not None
          else "")
    log(f"accuracy {s['acc']:.3f}  95% CI [{s['ci_low']:.3f}, {s['ci_high']:.3f}]  n = {s['n']} problems{per}{hl}")
    for table in ("by_level", "by_subject"):
        log(f"  {table[3:]:8} " + "  ".join(f"{g}: {v['acc']:.2f} ({v['n']})" for g, v in s[table].items()))

# -----------------------------------------------------------------------------
# the report over run folders


def report(folders, log=print):
    """One markdown table: run, experiment, the flags that differ from the experiment's defaults, accuracy
    at round 0 and at the end with its interval, the HL contexts' parse rate, how many restated x and how
    many carried x's answer (the leakage beside the number), rounds, wall-clock. Reads what alternate.py
    writes into each run folder: eval.json (with its `flags`) and metrics.jsonl (the round-0 evaluation)."""
    rows = []
    for folder in folders:
        eval_path, metrics_path = os.path.join(folder, "eval.json"), os.path.join(folder, "metrics.jsonl")
        if not os.path.exists(eval_path):
            log(f"(skipped {folder}: no eval.json)")
            continue
        try:
            ev = json.load(open(eval_path))
        except json.JSONDecodeError as e:
            log(f"(skipped {folder}: {eval_path} is not valid JSON ({e.msg}): a killed writer? rerun its evaluation)")
            continue
        first = "-"
        if os.path.exists(metrics_path):
            evals = [r for r in grpo.read_jsonl(metrics_path) if r.get("phase") == "eval"]
            first = f"{evals[0]['eval/acc']:.3f}" if evals else "-"
        rate = {k: "-" if ev.get(k) is None else f"{ev[k]:.2f}" for k in ("parse_rate", "ctx_self", "ctx_has_answer")}
        rows.append(f"| {os.path.basename(folder.rstrip('/'))} | {ev.get('exp', '-')} | {ev.get('flags') or '-'} | "
                    f"{first} | {ev['acc']:.3f} [{ev['ci_low']:.3f}, {ev['ci_high']:.3f}] | {ev['n']} | "
                    f"{rate['parse_rate']} | {rate['ctx_self']} | {rate['ctx_has_answer']} | "
                    f"{ev.get('rounds', '-')} | {ev.get('wall_clock', 0) / 60:.1f} min |")
    log("| run | exp | flags | acc, round 0 | acc, final (95% CI) | n | HL parse rate | HL restated x | "
        "context carried the answer | rounds | wall-clock |\n|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        log(r)
    groups = {}  # the seeds of one experiment: the same exp and flags but for seed=
    for folder in folders:
        ev = _final_eval(folder)
        if ev is not None:
            groups.setdefault((ev[0].get("exp", "-"), ", ".join(_flags(ev[0])) or "-"), []).append(ev)
    groups = {key: runs for key, runs in groups.items() if _same_problems(key, runs, log)}
    if any(len(runs) > 1 for runs in groups.values()):
        log("\nOver seeds (95% CI over problems: of each problem's mean over the seeds' answers, so that one "
            "problem's answers are not counted as independent trials; over seeds: t-based, over the seeds' "
            "accuracies, what a rerun with new seeds could give):\n\n| exp | flags | seeds | acc, mean | "
            "spread (min - max) | 95% CI over problems | 95% CI over seeds | context carried the answer |\n"
            "|---:|---|---:|---:|---|---|---|---:|")
        for (exp, flags), runs in sorted(groups.items(), key=lambda kv: str(kv[0])):
            accs = [ev["acc"] for ev, _ in runs]
            per_problem = {}
            for _, records in runs:
                for r in records:
                    per_problem.setdefault(r["unique_id"] or r["problem"], []).append(r["score"])
            mean, low, high = accuracy_interval([sum(v) / len(v) for v in per_problem.values()], len(runs))
            carried = [ev["ctx_has_answer"] for ev, _ in runs if ev.get("ctx_has_answer") is not None]
            over_seeds = seeds_interval(accs)
            log(f"| {exp} | {flags} | {len(runs)} | {mean:.3f} | {min(accs):.3f} - {max(accs):.3f} | "
                f"[{low:.3f}, {high:.3f}] | {'[%.3f, %.3f]' % over_seeds if over_seeds else '-'} | "
                f"{f'{sum(carried) / len(carried):.2f}' if carried else '-'} |")


def _flags(ev):
    """The flags of a run (eval.json's `flags`) but its seed: what makes runs seeds of one experiment. Read as
    alternate.py records them today, so that older runs group with newer ones: without the derived `steps=`,
    `--overwrite`, `--data` at today's default, and `--eval-data` at its --data's test split."""
    flags = [f for f in (ev.get("flags") or "").split(", ") if f and not f.startswith("seed=")]
    data = dict(f.split("=", 1) for f in flags if "=" in f).get("data", grpo.Config.data)
    derived = {f"data={grpo.Config.data}", f"eval_data={grpo.HELDOUT.get(data)}"}
    return [f for f in flags if f not in derived and not f.startswith(("steps=", "overwrite="))]


def _same_problems(key, runs, log):
    """Did the runs of one experiment answer the same problems (by unique_id)? Pooling their answers per problem
    assumes it; a run evaluated on other problems is not a seed of the same measurement (said, not pooled)."""
    asked = [sorted(str(r["unique_id"] or r["problem"]) for r in records) for _, records in runs]
    if all(a == asked[0] for a in asked):
        return True
    log(f"(not pooled over seeds: exp {key[0]}, {key[1]}: its runs evaluated different problems, "
        f"{' / '.join(str(len(a)) for a in asked)} of them)")
    return False


def _final_eval(folder):
    """(eval.json, the per-problem records of the evaluation it summarises) of a run folder, or None."""
    try:
        ev = json.load(open(os.path.join(folder, "eval.json")))
        return ev, grpo.read_jsonl(os.path.join(folder, f"eval_round{ev['rounds']}.jsonl"))
    except (OSError, KeyError, json.JSONDecodeError):
        return None

def plot(folders, out_png, log=print):
    """Learning curves of alternate.py runs, one panel per experiment (its exp and changed flags; the seeds
    of one experiment are its lines): the held-out accuracy at each evaluation (round 0 first) and the LL's
    training accuracy per round (the mean over that round's LL steps). matplotlib is an optional extra,
    imported here only."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib, an optional extra: pip install matplotlib") from None
    runs = []
    for folder in folders:
        path, eval_path = os.path.join(folder, "metrics.jsonl"), os.path.join(folder, "eval.json")
        if not (os.path.exists(path) and os.path.exists(eval_path)):
            log(f"(skipped {folder}: no metrics.jsonl and eval.json)")
            continue
        ev, records = json.load(open(eval_path)), grpo.read_jsonl(path)
        flags = _flags(ev)
        evals = [(r["step"], r["eval/acc"]) for r in records if r.get("phase") == "eval"]
        train = {}
        for r in records:
            if r.get("phase") == "ll":
                train.setdefault(r["step"], []).append(r["ll/acc"])
        runs.append((ev.get("exp", "?"), flags, os.path.basename(folder.rstrip("/")), evals,
                     sorted((t, sum(a) / len(a)) for t, a in train.items())))
    if not runs:
        raise SystemExit("--plot: no run folder with metrics.jsonl and eval.json among the arguments")
    common = set.intersection(*(set(r[1]) for r in runs))  # flags every run shares: said once, in the figure's title
    panels = {}
    for exp, flags, *curves in runs:
        label = textwrap.fill(f"exp {exp}" + "".join(f", {f}" for f in flags if f not in common), 60)
        panels.setdefault(label, []).append(curves)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False, sharex=True, sharey=True)
    for ax, (label, seeds) in zip(axes.flat, sorted(panels.items())):
        for k, (name, evals, train) in enumerate(seeds):
            colour = f"C{k}"
            ax.plot(*zip(*evals), "o-", color=colour, label=f"{name}: held-out")
            if train:
                ax.plot(*zip(*train), "--", color=colour, alpha=0.6, label=f"{name}: LL training rollouts")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes.flat[0].set_ylabel("accuracy (R_task)")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if common:
        fig.suptitle(textwrap.fill("all runs: " + ", ".join(sorted(common)), 120), fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    log(f"wrote {out_png}: {len(panels)} experiment(s), {sum(len(r) for r in panels.values())} run(s)")

# -----------------------------------------------------------------------------


@dataclass
class Config:
    EPILOG = ("A table of runs instead: python eval_math500.py --report runs/*  (reads each folder's eval.json)\n"
              "Learning curves: python eval_math500.py --plot runs/* --out curves.png  (needs matplotlib)")
    model: str = arg("smollm2", "the LL: smollm2, Qwen2.5-0.5B, a hub id, or a folder (a checkpoint)")
    hl_model: str = arg("", "the HL (a folder or name): each problem gets one greedy context first")
    data: str = arg("math500", "a JSONL path, a built-in test set (ops-test, arith-test), or math500 (the hub)")
    limit: int = arg(0, "the first N problems only (0 = all)", ge=0)
    samples: int = arg(1, "K answers per problem (mean accuracy); K > 1 needs --temperature > 0", ge=1)
    temperature: float = arg(0.0, "LL sampling temperature (0 = greedy)", ge=0)
    max_new_tokens: int = arg(512, "LL answer budget", ge=1)
    max_context_tokens: int = arg(384, "HL context budget", ge=1)
    batch_size: int = arg(16, "problems per batch", ge=1)
    seed: int = arg(0, "sampling seed", ge=0)
    context: str = field(default="auto", metadata={
        "help": "none; retrieved: the nearest --pool problem as a worked example (TF-IDF, same subject, never x "
                "itself); hl: one greedy context from --hl-model; auto: hl with --hl-model, else none",
        "choices": ["auto", "none", "retrieved", "hl"]})
    pool: str = arg("", "--context retrieved: problems to retrieve from (a JSONL path or a built-in name; default: "
                        "the training split of a built-in test set, e.g. ops for ops-test)")
    self_threshold: float = arg(0.9, "leakage guard: an HL example restating x (bag-of-words cosine >= this) is dropped",
                                gt=0, le=1)
    out: str = arg("runs/eval.jsonl", "every problem, context, response, extracted answer and verdict (JSONL)")
    device: str = arg("", "cuda / cpu (default: cuda when available)")
    precision: str = grpo.precision_flag()

    def check(self):
        grpo.Config.check(self)  # the same range and model checks as the training scripts'
        if self.context == "auto":
            self.context = "hl" if self.hl_model else "none"
        if (self.context == "hl") != bool(self.hl_model):
            raise SystemExit(f"--context {self.context} with{'out' if not self.hl_model else ''} --hl-model: "
                             f"HL contexts need an HL, and an HL is only used for --context hl")
        if self.pool and self.context != "retrieved":
            raise SystemExit("--pool is only used with --context retrieved")
        if self.context == "retrieved" and not self.pool:
            self.pool = next((train for train, test in grpo.HELDOUT.items() if test == self.data), "")
            if not self.pool:
                raise SystemExit("--context retrieved: pass --pool (the problems to retrieve worked examples from)")


def main(cfg):
    problems = grpo.load_problems(cfg.data, cfg.limit or None)  # the data first: a bad file stops before any model
    contexts = None
    if cfg.context == "retrieved":
        contexts = grpo.retrieve(problems, grpo.load_problems(cfg.pool), cfg.self_threshold)
        print(f"retrieved a worked example from {cfg.pool} for {sum(c is not None for c in contexts)} of "
              f"{len(problems)} problems")
    device = grpo.init_distributed(grpo.pick_device(cfg.device))  # under torchrun each rank scores a share
    model, tokenizer = grpo.load_model(cfg.model, device=device, precision=cfg.precision)
    hl_model = grpo.load_model(cfg.hl_model, device=device, flag="--hl-model",
                               precision=cfg.precision)[0].eval() if cfg.hl_model else None
    eos = grpo.eos_token_ids(model, tokenizer)
    print(f"evaluating {cfg.model} on {len(problems)} problems from {cfg.data}"
          f"{' with contexts from ' + cfg.hl_model if hl_model is not None else ''}"
          f"{' with retrieved worked examples' if contexts is not None else ''}, "
          f"{'greedy' if cfg.temperature == 0 else f'T = {cfg.temperature}'}, {cfg.samples} answer(s) each")
    summary = evaluate(model.eval(), tokenizer, problems, eos, hl_model, cfg.samples, cfg.temperature,
                       cfg.max_new_tokens, cfg.max_context_tokens, cfg.batch_size, cfg.seed, cfg.out,
                       self_threshold=cfg.self_threshold, contexts=contexts)
    print_summary(summary)
    grpo.write_json(os.path.splitext(cfg.out)[0] + ".summary.json", summary)
    print(f"wrote {cfg.out} and its .summary.json")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--report":
        report(sorted(f for a in sys.argv[2:] for f in (glob.glob(a) or [a])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--plot":  # --plot RUN... [--out FILE.png]
        args = sys.argv[2:]
        png = args.pop(args.index("--out") + 1) if "--out" in args[:-1] else "curves.png"
        plot(sorted(f for a in args if a != "--out" for f in (glob.glob(a) or [a])), png)
    else:
        main(grpo.parse_config(Config))
