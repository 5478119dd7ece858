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
import time
from dataclasses import dataclass

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
    """(mean, low, high) of per-problem scores (each the mean over its `samples` answers)."""
    n = len(scores)
    mean = sum(scores) / max(n, 1)
    if samples == 1:
        return (mean, *wilson_interval(round(sum(scores)), n))
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(n - 1, 1))
    half = 1.96 * sd / math.sqrt(max(n, 1))
    return mean, max(0.0, mean - half), min(1.0, mean + half)


@torch.no_grad()
def evaluate(ll_model, tokenizer, problems, eos, hl_model=None, samples=1, temperature=0.0, max_new_tokens=512,
             max_context_tokens=384, batch_size=16, seed=0, out_file=None, log=print, self_threshold=0.9):
    """Score the LL on problems (contexts from hl_model, greedy, when given). Returns the summary dict;
    writes one JSON line per problem to out_file when given. Beside each verdict, the leakage: whether the
    HL's output restated x (`ctx_self`: dropped, no context) and whether the context the LL saw carries
    x's own answer in its box (`ctx_has_answer`): a right answer there may be a copy."""
    if samples > 1 and temperature == 0:
        raise SystemExit("--samples K > 1 needs --temperature > 0 (greedy answers would all be the same)")
    records, t0 = [], time.time()
    for start in range(0, len(problems), batch_size):
        batch = problems[start:start + batch_size]
        contexts, hl_texts = [None] * len(batch), [None] * len(batch)
        if hl_model is not None:
            ctx, _, hl_out, _ = generate_contexts(hl_model, tokenizer, batch, 1, max_context_tokens, 0.0, eos,
                                                  self_threshold=self_threshold)
            contexts, hl_texts = [c[0] for c in ctx], tokenizer.batch_decode(hl_out, skip_special_tokens=True)
        prompts = [encode(tokenizer, format_prompt(tokenizer, p["problem"], c)) for p, c in zip(batch, contexts)]
        rows = [p for p in prompts for _ in range(samples)]
        answers, _ = generate(ll_model, rows, max_new_tokens, temperature, 1.0, eos,
                              seed=stream_seed(seed, "eval", start))
        texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
        for i, (p, c, hl_text) in enumerate(zip(batch, contexts, hl_texts)):
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
    if out_file:
        os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
        with open(out_file, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return summarize(records, samples, hl_model is not None, time.time() - t0)


def summarize(records, samples, with_hl, seconds):
    mean, low, high = accuracy_interval([r["score"] for r in records], samples)
    summary = {"acc": mean, "ci_low": low, "ci_high": high, "n": len(records), "samples": samples, "seconds": seconds,
               "by_level": {}, "by_subject": {}}
    for key in ("context_parsed", "ctx_self", "ctx_has_answer"):  # HL rates (None without an HL)
        name = "parse_rate" if key == "context_parsed" else key
        summary[name] = sum(r[key] for r in records) / max(len(records), 1) if with_hl else None
    for key, table in (("level", "by_level"), ("subject", "by_subject")):
        groups = {}
        for r in records:
            groups.setdefault(str(r.get(key)), []).append(r["score"])
        summary[table] = {g: {"acc": sum(s) / len(s), "n": len(s)} for g, s in sorted(groups.items())}
    return summary


def print_summary(s, log=print):
    per = f" x {s['samples']} samples" if s["samples"] > 1 else ""
    hl = (f"  | HL contexts: parse rate {s['parse_rate']:.2f}, restated x {s['ctx_self']:.2f}, carried the answer "
          f"{s['ctx_has_answer']:.2f}" if s["parse_rate"] is not None else "")
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

# -----------------------------------------------------------------------------


@dataclass
class Config:
    EPILOG = "A table of runs instead: python eval_math500.py --report runs/*  (reads each folder's eval.json)"
    model: str = arg("smollm2", "the LL: smollm2, Qwen2.5-0.5B, a hub id, or a folder (a checkpoint)")
    hl_model: str = arg("", "the HL (a folder or name): each problem gets one greedy context first")
    data: str = arg("math500", "a JSONL path, or math500 (HuggingFaceH4/MATH-500 from the hub)")
    limit: int = arg(0, "the first N problems only (0 = all)", ge=0)
    samples: int = arg(1, "K answers per problem (mean accuracy); K > 1 needs --temperature > 0", ge=1)
    temperature: float = arg(0.0, "LL sampling temperature (0 = greedy)", ge=0)
    max_new_tokens: int = arg(512, "LL answer budget", ge=1)
    max_context_tokens: int = arg(384, "HL context budget", ge=1)
    batch_size: int = arg(16, "problems per batch", ge=1)
    seed: int = arg(0, "sampling seed", ge=0)
    self_threshold: float = arg(0.9, "leakage guard: an HL example restating x (bag-of-words cosine >= this) is dropped",
                                gt=0, le=1)
    out: str = arg("runs/eval.jsonl", "every problem, context, response, extracted answer and verdict (JSONL)")
    device: str = arg("", "cuda / cpu (default: cuda when available)")

    def check(self):
        grpo.Config.check(self)  # the same range and model checks as the training scripts'


def main(cfg):
    problems = grpo.load_problems(cfg.data, cfg.limit or None)  # the data first: a bad file stops before any model
    device = grpo.pick_device(cfg.device)
    model, tokenizer = grpo.load_model(cfg.model, device=device)
    hl_model = grpo.load_model(cfg.hl_model, device=device, flag="--hl-model")[0].eval() if cfg.hl_model else None
    eos = grpo.eos_token_ids(model, tokenizer)
    print(f"evaluating {cfg.model} on {len(problems)} problems from {cfg.data}"
          f"{' with contexts from ' + cfg.hl_model if hl_model is not None else ''}, "
          f"{'greedy' if cfg.temperature == 0 else f'T = {cfg.temperature}'}, {cfg.samples} answer(s) each")
    summary = evaluate(model.eval(), tokenizer, problems, eos, hl_model, cfg.samples, cfg.temperature,
                       cfg.max_new_tokens, cfg.max_context_tokens, cfg.batch_size, cfg.seed, cfg.out,
                       self_threshold=cfg.self_threshold)
    print_summary(summary)
    grpo.write_json(os.path.splitext(cfg.out)[0] + ".summary.json", summary)
    print(f"wrote {cfg.out} and its .summary.json")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--report":
        report(sorted(f for a in sys.argv[2:] for f in (glob.glob(a) or [a])))
    else:
        main(grpo.parse_config(Config))
