"""eval_math500.py: the LL's accuracy on MATH-500 (or any JSONL, ops-test) with no context or a
greedy one per problem from --hl-model: 95% intervals, per level and subject, every generation
saved. Over run folders: --report RUN... (a table), --plot RUN... [--out FILE.png] (learning
curves)."""

import json
import math
import os
import sys
import textwrap
import time
from dataclasses import dataclass

import grpo
from grpo import arg, encode, format_context, format_prompt, generate, stream_seed
from hl_generator import generate_contexts, parse_context
from math_reward import carries_answer, extract_boxed, reward, right_operator

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
    """95% interval of the mean over seeds: mean +- t_{0.975, n-1} sd / sqrt(n) (beyond the table,
    t's Cornish-Fisher expansion)."""
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


# --- 2. the evaluation ----------------------------------------------------------------------------


def evaluate(
    ll_model,
    tokenizer,
    problems,
    eos,
    hl_model=None,
    temperature=0.0,
    max_new_tokens=512,
    max_context_tokens=384,
    batch_size=16,
    seed=0,
    out_file=None,
    log=print,
    self_threshold=0.9,
    contexts=None,
):
    """The LL's answers with a greedy context per problem from hl_model, else the given contexts,
    else none: a record per problem (saved to out_file) and their summary."""
    if hl_model is not None:
        source = "hl"
    elif contexts is not None:
        source = "given"
    else:
        source = "none"
    contexts = grpo.my_share(contexts or [None] * len(problems))  # under torchrun, a rank's share
    problems = grpo.my_share(problems)
    records, t0 = [], time.time()
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        ctxs = contexts[start : start + batch_size]
        hl_texts = [None] * len(batch)
        if hl_model is not None:
            ctx, _, hl_out, _ = generate_contexts(
                hl_model,
                tokenizer,
                batch,
                1,
                max_context_tokens,
                0.0,
                eos,
                self_threshold=self_threshold,
            )
            ctxs = [c[0] for c in ctx]
            hl_texts = tokenizer.batch_decode(hl_out, skip_special_tokens=True)
        seed_b = stream_seed(seed, "eval", start)
        texts = answer(ll_model, tokenizer, batch, ctxs, max_new_tokens, temperature, eos, seed_b)
        for p, c, hl_text, text in zip(batch, ctxs, hl_texts, texts):
            records.append(answer_record(p, c, hl_text, text))
        accuracy = sum(r["score"] for r in records) / len(records)
        log(f"eval {len(records)}/{len(problems)} | acc so far {accuracy:.3f}")
    records = grpo.gather(records)
    if out_file and grpo.rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
        open(out_file, "w").writelines(json.dumps(r) + "\n" for r in records)
    summary = summarise(records, source)
    summary.update(seconds=time.time() - t0, max_new_tokens=max_new_tokens)
    return summary


def answer(model, tokenizer, batch, contexts, max_new_tokens, temperature, eos, seed):
    """The LL's answers (text) to a batch of problems, each with its context or none."""
    prompts = []
    for p, c in zip(batch, contexts):
        prompts.append(encode(tokenizer, format_prompt(tokenizer, p["problem"], c)))
    answers, _ = generate(model, prompts, max_new_tokens, temperature, eos, seed=seed)
    return tokenizer.batch_decode(answers, skip_special_tokens=True)


def answer_record(problem, context, hl_text, response):
    """One problem's evaluation: its context (and the HL's raw output), the answer, its verdict, and
    what the context leaked."""
    # rule 1b
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
        "ctx_right_op": right_operator(problem["problem"], context),
        "response": response,
        "extracted": extract_boxed(response),
        "score": reward(response, problem["answer"]),
    }


def summarise(records, source):
    """Accuracy with its Wilson interval, per level and per subject, and the contexts' rates (None
    where they do not apply: no HL, no context, not an ops task)."""
    n = len(records)
    right = sum(r["score"] for r in records)
    low, high = wilson_interval(right, n)
    s = {"acc": right / max(n, 1), "ci_low": low, "ci_high": high, "n": n, "context": source}
    for key in ("level", "subject"):
        groups = {}
        for r in records:
            groups.setdefault(str(r.get(key)), []).append(r["score"])
        s["by_" + key] = {
            g: {"acc": sum(v) / len(v), "n": len(v)} for g, v in sorted(groups.items())
        }
    shown = []
    if source == "hl":
        shown += ["context_parsed", "ctx_self"]
    if source != "none":
        shown += ["ctx_has_answer", "ctx_right_op"]
    for key, name in (
        ("context_parsed", "parse_rate"),
        ("ctx_self", "ctx_self"),
        ("ctx_has_answer", "ctx_has_answer"),
        ("ctx_right_op", "ctx_right_op"),
    ):
        values = [r[key] for r in records]
        s[name] = sum(values) / max(n, 1) if key in shown and None not in values else None
    return s


def print_summary(s, log=print):
    names = (
        ("parse_rate", "HL parse rate"),
        ("ctx_self", "restated x"),
        ("ctx_has_answer", "carried the answer"),
        ("ctx_right_op", "right operator"),
    )
    rates = ", ".join(f"{w} {s[k]:.2f}" for k, w in names if s.get(k) is not None)
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
    """Markdown: a row per run folder (accuracy at round 0 and at the end, the contexts' rates and
    leakage); then per experiment over its seeds: the mean, the spread and the t-interval."""

    def fmt(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    runs = _runs(folders, log)  # a skipped folder is said before the table
    log(
        "| run | exp | flags | acc, round 0 | acc, final (95% CI) | n | HL parse rate | "
        "HL restated x | "
        "context carried the answer | right operator | rounds | wall-clock |\n"
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    groups = {}
    for name, ev, metrics in runs:
        first = next((r["eval/acc"] for r in metrics if r.get("phase") == "eval"), None)
        rates = [
            fmt(ev.get(k)) for k in ("parse_rate", "ctx_self", "ctx_has_answer", "ctx_right_op")
        ]
        final = f"{ev['acc']:.3f} [{ev['ci_low']:.3f}, {ev['ci_high']:.3f}]"
        minutes = f"{ev.get('wall_clock', 0) / 60:.1f} min"
        cells = [
            name,
            ev.get("exp", "-"),
            ev.get("flags") or "-",
            fmt(first, ".3f"),
            final,
            ev["n"],
        ]
        cells += [*rates, ev.get("rounds", "-"), minutes]
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
        log(
            f"| {exp} | {flags} | {len(accs)} | {mean:.3f} | "
            f"{min(accs):.3f} - {max(accs):.3f} | {interval} |"
        )


def plot(folders, out_png, log=print):
    """Learning curves, a panel per experiment, a colour per seed: held-out accuracy (o-) and, on
    the ops tasks, the right-operator rate (x--)."""
    os.environ.setdefault("MPLBACKEND", "Agg")  # files only, no display
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    panels = {}
    for name, ev, metrics in _runs(folders, log):
        panels.setdefault(_experiment(ev), []).append((name, metrics))
    n = max(1, len(panels))
    fig, axes = plt.subplots(
        1, n, figsize=(4.5 * n, 3.4), squeeze=False, sharey=True, layout="tight"
    )
    for ax, ((exp, flags), runs) in zip(axes.flat, sorted(panels.items(), key=str)):
        for name, metrics in runs:
            evals = [r for r in metrics if r.get("phase") == "eval"]
            rounds = [r["step"] for r in evals]
            (line,) = ax.plot(rounds, [r["eval/acc"] for r in evals], "o-", label=name)
            right_op = [r.get("eval/ctx_right_op") for r in evals]
            if None not in right_op:  # the ops tasks' contexts
                ax.plot(rounds, right_op, "x--", color=line.get_color())
        title = textwrap.fill(f"exp {exp}, {flags}", 40)
        ax.set(title=title, xlabel="round", ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.legend(fontsize=6)
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
    with_hl = "with" if hl else "without"
    print(
        f"evaluating {cfg.model} on {len(problems)} problems of {cfg.data}, {with_hl} HL contexts"
    )
    s = evaluate(
        model.eval(),
        tokenizer,
        problems,
        grpo.eos_token_ids(model, tokenizer),
        hl,
        max_new_tokens=cfg.max_new_tokens,
        max_context_tokens=cfg.max_context_tokens,
        out_file=cfg.out,
    )
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
