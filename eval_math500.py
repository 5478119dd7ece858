"""
eval_math500.py: the LL's accuracy on MATH-500 (or any JSONL, ops-test) with no context or a greedy one per problem from
--hl-model: 95% intervals, per level and subject, every generation saved. Over run folders: --report RUN..., --plot RUN...
"""

import json, math, os, sys, textwrap, time
from dataclasses import dataclass

import grpo
from grpo import arg, encode, format_context, format_prompt, generate, stream_seed
from hl_generator import generate_contexts, parse_context
from math_reward import carries_answer, extract_boxed, reward, right_operator

# the intervals (README deviation 15) ---------------------------------------------------------------------------------


def wilson_interval(k, n, z=1.96):
    """95% Wilson score interval for k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p, d = k / n, 1 + z * z / n
    centre, half = (
        (p + z * z / (2 * n)) / d,
        z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d,
    )
    return max(0.0, centre - half), min(1.0, centre + half)


T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
)  # Student t_{0.975, df}, df 1-10


def seeds_interval(accs):
    """95% interval of the mean over seeds, mean +- t_{0.975, n-1} sd / sqrt(n) (t's expansion beyond the table)."""
    n, z = len(accs), 1.959964
    if n < 2:
        return None
    mean, df = sum(accs) / n, n - 1
    t = (
        T975[df - 1]
        if df <= 10
        else z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    )
    half = t * math.sqrt(sum((a - mean) ** 2 for a in accs) / (n - 1) / n)
    return max(0.0, mean - half), min(1.0, mean + half)


# the evaluation ------------------------------------------------------------------------------------------------------


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
    """The LL's answers with a greedy context per problem from hl_model, else the given contexts, else none."""
    source = "hl" if hl_model is not None else "given" if contexts is not None else "none"
    problems, contexts = (
        grpo.my_share(problems),
        grpo.my_share(contexts or [None] * len(problems)),
    )  # torchrun
    records, t0 = [], time.time()
    for start in range(0, len(problems), batch_size):
        batch, ctxs, hl_texts = (
            problems[start : start + batch_size],
            contexts[start : start + batch_size],
            [None] * batch_size,
        )
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
            ctxs, hl_texts = (
                [c[0] for c in ctx],
                tokenizer.batch_decode(hl_out, skip_special_tokens=True),
            )
        prompts = [
            encode(tokenizer, format_prompt(tokenizer, p["problem"], c))
            for p, c in zip(batch, ctxs)
        ]
        answers, _ = generate(
            ll_model,
            prompts,
            max_new_tokens,
            temperature,
            eos,
            seed=stream_seed(seed, "eval", start),
        )
        texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
        for p, c, hl_text, text, ids in zip(batch, ctxs, hl_texts, texts, answers):
            restated = (
                c is None and hl_text is not None and parse_context(hl_text) is not None
            )  # dropped (rule 1b)
            records.append(
                {
                    "unique_id": p.get("unique_id"),
                    "level": p.get("level"),
                    "subject": p.get("subject"),
                    "problem": p["problem"],
                    "answer": p["answer"],
                    "hl_output": hl_text,
                    "context": format_context(c) if c else None,
                    "context_parsed": c is not None or restated,
                    "ctx_self": restated,
                    "ctx_has_answer": carries_answer(c, p["answer"]),
                    "ctx_right_op": right_operator(p["problem"], c),
                    "response": text,
                    "extracted": extract_boxed(text),
                    "score": reward(text, p["answer"]),
                    "finished": bool(ids) and ids[-1] in eos,
                }
            )
        log(
            f"eval {len(records)}/{len(problems)} | acc so far {sum(r['score'] for r in records) / len(records):.3f}"
        )
    records = grpo.gather(records)
    if out_file and grpo.rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
        open(out_file, "w").writelines(json.dumps(r) + "\n" for r in records)
    right, n = sum(r["score"] for r in records), len(records)
    s = {
        "acc": right / max(n, 1),
        **dict(zip(("ci_low", "ci_high"), wilson_interval(right, n))),
        "n": n,
        "seconds": time.time() - t0,
        "context": source,
        "max_new_tokens": max_new_tokens,
        "finished": sum(r["finished"] for r in records) / max(n, 1),
    }  # answers that ended before the budget
    for key in ("level", "subject"):  # the accuracy per level, per subject
        s["by_" + key] = {
            g: {"acc": sum(v) / len(v), "n": len(v)}
            for g in sorted({str(r.get(key)) for r in records})
            for v in [[r["score"] for r in records if str(r.get(key)) == g]]
        }
    shown = ("context_parsed", "ctx_self") * (source == "hl") + (
        "ctx_has_answer",
        "ctx_right_op",
    ) * (source != "none")
    rate = lambda k: (
        sum(r[k] for r in records) / max(n, 1)
        if k in shown and None not in {r[k] for r in records}
        else None
    )
    return dict(
        s,
        parse_rate=rate("context_parsed"),
        **{k: rate(k) for k in ("ctx_self", "ctx_has_answer", "ctx_right_op")},
    )


def print_summary(s, log=print):
    rates = ", ".join(
        f"{w} {s[k]:.2f}"
        for k, w in (
            ("parse_rate", "HL parse rate"),
            ("ctx_self", "restated x"),
            ("ctx_has_answer", "carried the answer"),
            ("ctx_right_op", "right operator"),
        )
        if s.get(k) is not None
    )
    log(
        f"accuracy {s['acc']:.3f}  95% CI [{s['ci_low']:.3f}, {s['ci_high']:.3f}]  n = {s['n']} problems"
        + (f"  | {rates}" if rates else "")
    )
    for table in ("by_level", "by_subject"):
        log(
            f"  {table[3:]:8} "
            + "  ".join(f"{g}: {v['acc']:.2f} ({v['n']})" for g, v in s[table].items())
        )


# the report and the learning curves over alternate.py's run folders --------------------------------------------------


def _runs(
    folders, log
):  # (name, eval.json, metrics.jsonl records) of each run folder with an eval.json
    runs = []
    for folder in folders:
        try:
            ev = json.load(open(os.path.join(folder, "eval.json")))
        except (OSError, ValueError) as e:  # missing, or torn by a killed writer
            log(f"(skipped {folder}: no valid eval.json: {type(e).__name__})")
            continue
        path = os.path.join(folder, "metrics.jsonl")
        runs.append(
            (
                os.path.basename(folder.rstrip("/")),
                ev,
                grpo.read_jsonl(path) if os.path.exists(path) else [],
            )
        )
    return runs


def _experiment(
    ev,
):  # (exp, its flags but seed=): the runs of one experiment differ only in their seed
    flags = [f for f in (ev.get("flags") or "").split(", ") if f and not f.startswith("seed=")]
    return ev.get("exp", "-"), ", ".join(flags) or "-"


def report(folders, log=print):
    """Markdown: a row per run folder (accuracy at round 0 and at the end, the contexts' rates and leakage); then per
    experiment over its seeds: the mean accuracy, the spread and the t-interval over seeds."""
    fmt, groups, runs = (
        lambda v, spec=".2f": "-" if v is None else format(v, spec),
        {},
        _runs(folders, log),
    )
    log(
        "| run | exp | flags | acc, round 0 | acc, final (95% CI) | n | HL parse rate | HL restated x | context carried "
        "the answer | right operator | rounds | wall-clock |\n|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for name, ev, metrics in runs:
        first = next((r["eval/acc"] for r in metrics if r.get("phase") == "eval"), None)
        cells = [
            name,
            ev.get("exp", "-"),
            ev.get("flags") or "-",
            fmt(first, ".3f"),
            f"{ev['acc']:.3f} [{ev['ci_low']:.3f}, {ev['ci_high']:.3f}]",
            ev["n"],
            *(fmt(ev.get(k)) for k in ("parse_rate", "ctx_self", "ctx_has_answer", "ctx_right_op")),
            ev.get("rounds", "-"),
            f"{ev.get('wall_clock', 0) / 60:.1f} min",
        ]
        log("| " + " | ".join(map(str, cells)) + " |")
        groups.setdefault(_experiment(ev), []).append(ev["acc"])
    if any(len(accs) > 1 for accs in groups.values()):
        log(
            "\n| exp | flags | seeds | acc, mean | spread (min - max) | 95% CI over seeds |\n|---:|---|---:|---:|---|---|"
        )
        for (exp, flags), accs in sorted(groups.items(), key=str):
            ci = seeds_interval(accs)
            log(
                f"| {exp} | {flags} | {len(accs)} | {sum(accs) / len(accs):.3f} | {min(accs):.3f} - {max(accs):.3f} | "
                f"{'[%.3f, %.3f]' % ci if ci else '-'} |"
            )


def plot(folders, out_png, log=print):
    """Learning curves, a panel per experiment, a colour per seed: held-out accuracy (o-), right-operator rate (x--)."""
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
            (line,) = ax.plot(
                [r["step"] for r in evals], [r["eval/acc"] for r in evals], "o-", label=name
            )
            if None not in (
                ops := [r.get("eval/ctx_right_op") for r in evals]
            ):  # the ops tasks' contexts
                ax.plot([r["step"] for r in evals], ops, "x--", color=line.get_color())
        ax.set(
            title=textwrap.fill(f"exp {exp}, {flags}", 40),
            xlabel="round",
            ylabel="accuracy",
            ylim=(-0.02, 1.02),
        )
        ax.legend(fontsize=6)
    fig.savefig(out_png, dpi=110)
    log(f"wrote {out_png}: {len(panels)} experiment(s)")


# flags, main ---------------------------------------------------------------------------------------------------------


@dataclass
class Config:
    model: str = arg(
        "smollm2", "the LL: smollm2, Qwen2.5-0.5B, a hub id, or a folder (OUT/ckpt/ll)"
    )
    hl_model: str = arg(
        "", "an HL (a folder, e.g. OUT/ckpt/hl): each problem gets one greedy context first"
    )
    data: str = arg(
        "math500", "a JSONL path, ops-test or ops-mix-test (built-in), or math500 (the hub)"
    )
    limit: int = arg(0, "the first N problems only (0 = all)", ge=0)
    max_new_tokens: int = arg(512, "LL answer budget", ge=1)
    max_context_tokens: int = arg(384, "HL context budget", ge=1)
    out: str = arg(
        "runs/eval.jsonl", "every problem, context, response, extracted answer and verdict (JSONL)"
    )
    device: str = arg("", "cuda / cpu (default: cuda when available)")
    precision: str = arg(
        "auto", "auto: bf16 on a GPU, fp32 on a CPU", choices=["auto", "fp32", "bf16"]
    )


def main(cfg):
    problems = grpo.load_problems(
        cfg.data, cfg.limit or None
    )  # the data first: a bad file stops before any model
    device = grpo.init_distributed(cfg.device, {})  # under torchrun each rank scores a share
    model, tokenizer = grpo.load_model(cfg.model, device, precision=cfg.precision)
    hl = (
        grpo.load_model(cfg.hl_model, device, precision=cfg.precision, flag="--hl-model")[0]
        if cfg.hl_model
        else None
    )
    print(
        f"evaluating {cfg.model} on {len(problems)} problems of {cfg.data}, {'with' if hl else 'without'} HL contexts"
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
