"""eval_math500.py: the LL's accuracy on MATH-500 or any JSONL, with no context or the greedy one of
--hl-model, every answer saved. Over run folders: --report RUN..., --plot RUN... [--out PNG]."""

import json
import math
import os
import sys
import textwrap
import time
from dataclasses import dataclass

import grpo
from grpo import arg, encode, format_context, format_prompt, generate
from hl_generator import generate_contexts, parse_context
from math_reward import carries_answer, context_quality, extract_boxed, reward

# --- 1. the intervals (README deviation 15) -------------------------------------------------------


def wilson_interval(k, n, z=1.96):
    """95% Wilson score interval for k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # t_0.975, df 1-10


def seeds_interval(accs):
    """95% interval of the mean over seeds: mean +- t_{0.975, n-1} sd / sqrt(n)."""
    n, z = len(accs), 1.959964
    if n < 2:
        return None
    mean, df = sum(accs) / n, n - 1
    if df <= 10:
        t = T975[df - 1]
    else:
        t = z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    half = t * math.sqrt(sum((a - mean) ** 2 for a in accs) / (n - 1) / n)
    return max(0.0, mean - half), min(1.0, mean + half)


# a summary's rates of the contexts: name -> (the record field it counts, its printed words)
RATES = {
    "parse_rate": ("context_parsed", "HL parse rate"),
    "ctx_self": ("ctx_self", "restated x"),
    "ctx_has_answer": ("ctx_has_answer", "carried the answer"),
    "ctx_right_op": ("ctx_right_op", "right operator"),
    "ctx_good": ("ctx_good", "good example"),
}

# --- 2. the evaluation ----------------------------------------------------------------------------


def evaluate(
    model, tokenizer, problems, eos, cfg, hl=None, contexts=None, out_file=None, batch_size=16
):
    """The LL's greedy answers with the HL's greedy contexts, the given ones, or none: a summary."""
    source = "given" if contexts is not None else "none"
    if hl is not None:
        source = "hl"
    contexts = grpo.my_share(contexts or [None] * len(problems))  # under torchrun, a rank's share
    problems = grpo.my_share(problems)
    records, t0 = [], time.time()
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        ctxs = contexts[start : start + batch_size]
        hl_texts = [None] * len(batch)
        if hl is not None:
            args = (hl, tokenizer, batch, 1, cfg.max_context_tokens, 0.0, eos)
            ctx, _, hl_out, _ = generate_contexts(*args, self_threshold=cfg.self_threshold)
            ctxs = [c[0] for c in ctx]
            hl_texts = tokenizer.batch_decode(hl_out, skip_special_tokens=True)
        prompts = []
        for p, c in zip(batch, ctxs):
            prompts.append(encode(tokenizer, format_prompt(tokenizer, p["problem"], c)))
        answers, _ = generate(model, prompts, cfg.max_new_tokens, 0.0, eos)  # greedy
        texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
        records += [answer_record(*row) for row in zip(batch, ctxs, hl_texts, texts)]
        accuracy = sum(r["score"] for r in records) / len(records)
        print(f"eval {len(records)}/{len(problems)} | acc so far {accuracy:.3f}")
    records = grpo.gather(records)
    if out_file and grpo.rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
        open(out_file, "w").writelines(json.dumps(r) + "\n" for r in records)
    summary = summarise(records, source)
    summary.update(seconds=time.time() - t0, max_new_tokens=cfg.max_new_tokens)
    return summary


def answer_record(problem, context, hl_text, response):
    """One problem's evaluation: its context (the HL's raw output), answer, verdict, leakage."""
    # rule 1b: the HL's output parsed, but restated x
    restated = context is None and hl_text is not None and parse_context(hl_text) is not None
    return {
        "unique_id": problem.get("unique_id"),
        "level": problem.get("level"),
        "subject": problem.get("subject"),
        "problem": problem["problem"],
        "answer": problem["answer"],
        "hl_output": hl_text,
        "context": format_context(context) if context else None,
        "context_parsed": context is not None or restated,
        "ctx_self": restated,
        "ctx_has_answer": carries_answer(context, problem["answer"]),
        **context_quality(problem["problem"], context),
        "response": response,
        "extracted": extract_boxed(response),
        "score": reward(response, problem["answer"]),
    }


def summarise(records, source):
    """Accuracy with its Wilson interval, per level and subject, the contexts' rates (or None)."""
    n = len(records)
    right = sum(r["score"] for r in records)
    low, high = wilson_interval(right, n)
    s = {"acc": right / max(n, 1), "ci_low": low, "ci_high": high, "n": n, "context": source}
    for key in ("level", "subject"):
        groups = {}
        for r in records:
            groups.setdefault(str(r.get(key)), []).append(r["score"])
        table = {g: {"acc": sum(v) / len(v), "n": len(v)} for g, v in sorted(groups.items())}
        s["by_" + key] = table
    for name, (key, _) in RATES.items():
        values = [r[key] for r in records]
        applies = source == "hl" or (source == "given" and name not in ("parse_rate", "ctx_self"))
        s[name] = sum(values) / max(n, 1) if applies and None not in values else None
    return s


def print_summary(s, log=print):
    rates = ", ".join(f"{RATES[k][1]} {s[k]:.2f}" for k in RATES if s.get(k) is not None)
    interval = f"[{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
    line = f"accuracy {s['acc']:.3f}  95% CI {interval}  n = {s['n']} problems"
    log(line + (f"  | {rates}" if rates else ""))
    for table in ("by_level", "by_subject"):
        cells = "  ".join(f"{g}: {v['acc']:.2f} ({v['n']})" for g, v in s[table].items())
        log(f"  {table[3:]:8} {cells}")


# --- 3. the report and the learning curves over alternate.py's run folders ------------------------


def _runs(folders, log):
    """(name, eval.json, metrics.jsonl records) of each run folder with a valid eval.json."""
    runs = []
    for folder in folders:
        try:
            ev = json.load(open(os.path.join(folder, "eval.json")))
        except (OSError, ValueError) as e:  # missing, or torn by a killed writer
            log(f"(skipped {folder}: no valid eval.json: {type(e).__name__})")
            continue
        path = os.path.join(folder, "metrics.jsonl")
        metrics = grpo.read_jsonl(path) if os.path.exists(path) else []
        runs.append((os.path.basename(folder.rstrip("/")), ev, metrics))
    return runs


def _experiment(ev):
    """(exp, its flags but seed=): the runs of one experiment differ only in their seed."""
    flags = [f for f in (ev.get("flags") or "").split(", ") if f and not f.startswith("seed=")]
    return ev.get("exp", "-"), ", ".join(flags) or "-"


def report(folders, log=print):
    """Markdown: a row per run folder, then per experiment over its seeds: mean and t-interval."""

    def fmt(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    runs = _runs(folders, log)  # a skipped folder is said before the table
    rates = " | ".join(words for _, words in RATES.values())
    columns = f"run | exp | flags | acc, round 0 | acc, final (95% CI) | n | {rates}"
    log(f"| {columns} | rounds | wall-clock |")
    log("|---|---:|---|---:|---|---:|" + "---:|" * (len(RATES) + 2))
    groups = {}
    for name, ev, metrics in runs:
        first = next((r["eval/acc"] for r in metrics if r.get("phase") == "eval"), None)
        final = f"{ev['acc']:.3f} [{ev['ci_low']:.3f}, {ev['ci_high']:.3f}]"
        cells = [name, ev.get("exp", "-"), ev.get("flags") or "-", fmt(first, ".3f"), final]
        cells += [ev["n"], *[fmt(ev.get(k)) for k in RATES]]
        cells += [ev.get("rounds", "-"), f"{ev.get('wall_clock', 0) / 60:.1f} min"]
        log("| " + " | ".join(map(str, cells)) + " |")
        groups.setdefault(_experiment(ev), []).append(ev["acc"])
    if not any(len(accs) > 1 for accs in groups.values()):
        return
    log("\n| exp | flags | seeds | acc, mean | spread (min - max) | 95% CI over seeds |")
    log("|---:|---|---:|---:|---|---|")
    for (exp, flags), accs in sorted(groups.items(), key=str):
        ci = seeds_interval(accs)
        interval = "[%.3f, %.3f]" % ci if ci else "-"
        mean = sum(accs) / len(accs)
        spread = f"{min(accs):.3f} - {max(accs):.3f}"
        log(f"| {exp} | {flags} | {len(accs)} | {mean:.3f} | {spread} | {interval} |")


def before_after(evals, with_contexts):
    """A run's closing verdict: round 0 against its last evaluation, made on the same settings."""
    first, last = evals[0], evals[-1]
    if first["step"] != 0:
        return f"before/after: no round-0 evaluation to compare round {last['step']} with"
    settings = [(r["eval/n"], r.get("eval/max_new_tokens")) for r in (first, last)]
    if settings[0] != settings[1]:
        return f"before/after: evaluated on (problems, tokens) {settings}: not compared"
    apart = last["eval/ci_low"] > first["eval/ci_high"]
    verdict = "a gain: intervals apart" if apart else "intervals overlap"
    line = (
        f"before/after: accuracy {_acc(first)} at round 0 -> {_acc(last)} after round "
        f"{last['step']} on {last['eval/n']} problems at {last['eval/max_new_tokens']} tokens: "
        f"{verdict}"
    )
    if with_contexts:
        line += f"; contexts that carried the answer: {last['eval/ctx_has_answer']:.2f}"
    return line


def _acc(r):  # an evaluation's accuracy and its interval
    return f"{r['eval/acc']:.3f} [{r['eval/ci_low']:.3f}, {r['eval/ci_high']:.3f}]"


def plot(folders, out_png, log=print):
    """Curves per experiment, a colour per seed: accuracy (o-), right operator (x--), good (+:)."""
    os.environ.setdefault("MPLBACKEND", "Agg")  # files only, no display
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    panels = {}
    for name, ev, metrics in _runs(folders, log):
        panels.setdefault(_experiment(ev), []).append((name, metrics))
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.4), squeeze=False, sharey=True)
    for ax, ((exp, flags), runs) in zip(axes.flat, sorted(panels.items(), key=str)):
        for name, metrics in runs:
            evals = [r for r in metrics if r.get("phase") == "eval"]
            rounds = [r["step"] for r in evals]
            (line,) = ax.plot(rounds, [r["eval/acc"] for r in evals], "o-", label=name)
            for key, style in (("eval/ctx_right_op", "x--"), ("eval/ctx_good", "+:")):
                if None not in [r.get(key) for r in evals]:  # the ops tasks' contexts
                    ax.plot(rounds, [r[key] for r in evals], style, color=line.get_color())
        title = textwrap.fill(f"exp {exp}, {flags}", 40)
        ax.set(title=title, xlabel="round", ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    log(f"wrote {out_png}: {len(panels)} experiment(s)")


# --- 4. flags, main -------------------------------------------------------------------------------


@dataclass
class Config:
    model: str = arg("smollm2", "the LL: smollm2, Qwen2.5-0.5B, a hub id, a folder (OUT/ckpt/ll)")
    hl_model: str = arg("", "an HL folder (OUT/ckpt/hl): one greedy context per problem first")
    data: str = arg("math500", "a JSONL path, ops-test or ops-mix-test, or math500 (the hub)")
    limit: int = arg(0, "the first N problems only (0 = all)", ge=0)
    max_new_tokens: int = arg(512, "LL answer budget", ge=1)
    max_context_tokens: int = arg(384, "HL context budget", ge=1)
    self_threshold: float = arg(0.9, "leakage guard: cosine that makes an example x", gt=0, le=1)
    out: str = arg("runs/eval.jsonl", "every problem, context, response and verdict (JSONL)")
    device: str = arg("", "cuda / cpu (default: cuda when available)")
    precision: str = arg("auto", "auto: bf16 on a GPU, else fp32", choices=["auto", "fp32", "bf16"])


def main(cfg):
    problems = grpo.load_problems(cfg.data, cfg.limit or None)  # a bad file stops before any model
    device = grpo.init_distributed(cfg.device, {})  # under torchrun each rank scores a share
    model, tokenizer = grpo.load_model(cfg.model, device, precision=cfg.precision)
    hl = None
    if cfg.hl_model:
        hl, _ = grpo.load_model(cfg.hl_model, device, precision=cfg.precision, flag="--hl-model")
    print(f"evaluating {cfg.model} on {len(problems)} problems of {cfg.data}, HL: {cfg.hl_model}")
    eos = grpo.eos_token_ids(model, tokenizer)
    s = evaluate(model.eval(), tokenizer, problems, eos, cfg, hl, out_file=cfg.out)
    print_summary(s)
    grpo.write_json(os.path.splitext(cfg.out)[0] + ".summary.json", s)


if __name__ == "__main__":
    args = sys.argv[2:]  # --report RUN...  |  --plot RUN... [--out FILE.png]
    if sys.argv[1:2] == ["--report"]:
        report(args)
    elif sys.argv[1:2] == ["--plot"]:
        png = args.pop(args.index("--out") + 1) if "--out" in args[:-1] else "curves.png"
        plot([a for a in args if a != "--out"], png)
    else:
        main(grpo.parse_config(Config))
