"""Tests for eval_math500.py: the intervals against hand-computed values, evaluate's records and summary, the
flags, the report (a row per run, and over seeds), the plot, the command line."""
import json
import math
import os
import subprocess
import sys

import pytest

import eval_math500
import grpo
from hl_generator import retrieve

ROOT = os.path.join(os.path.dirname(__file__), "..")

# -----------------------------------------------------------------------------
# the intervals


def test_wilson_interval():
    lo, hi = eval_math500.wilson_interval(0, 5)
    assert lo == 0.0 and hi == pytest.approx(0.4345, abs=1e-4)  # not the point [0, 0] of the normal interval
    assert eval_math500.wilson_interval(50, 100) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    assert eval_math500.wilson_interval(0, 0) == (0.0, 1.0)


def test_seeds_interval():
    assert eval_math500.seeds_interval([0.3]) is None
    # mean 0.5, sd 0.125, t_{0.975, 2} = 4.303: half-width 4.303 * 0.125 / sqrt(3) = 0.311
    assert eval_math500.seeds_interval([0.5, 0.625, 0.375]) == (pytest.approx(0.1895, abs=1e-4),
                                                                pytest.approx(0.8105, abs=1e-4))
    # sd 0.02 / sqrt(2), t_{0.975, 1} = 12.706: half-width 12.706 * 0.01
    assert eval_math500.seeds_interval([0.5, 0.52]) == (pytest.approx(0.51 - 0.12706), pytest.approx(0.51 + 0.12706))
    assert eval_math500.seeds_interval([0.0, 1.0]) == (0.0, 1.0)  # clipped to [0, 1]


@pytest.mark.parametrize("df, exact", [(10, 2.228), (11, 2.201), (20, 2.086), (30, 2.042), (1000, 1.962)])
def test_seeds_interval_uses_students_t(df, exact):
    accs = [0.4, 0.6] * ((df + 1) // 2) + [0.5] * ((df + 1) % 2)  # df + 1 seeds
    n, mean = len(accs), sum(accs) / len(accs)
    sd_mean = math.sqrt(sum((a - mean) ** 2 for a in accs) / (n - 1) / n)
    lo, hi = eval_math500.seeds_interval(accs)
    assert (hi - lo) / 2 == pytest.approx(exact * sd_mean, abs=0.003 * sd_mean)  # a z of 1.96 would be off by more

# -----------------------------------------------------------------------------
# evaluate


def boxed_answers(tokenizer, problems, right):
    """A stand-in for the sampler: row i of a batch answers \\boxed{its gold answer} when right(i), else \\boxed{x}."""
    def fake_generate(model, rows, max_new_tokens, temperature, eos, seed=None):
        gold = [next(p["answer"] for p in problems if p["problem"] in tokenizer.decode(r)) for r in rows]
        return [tokenizer.encode(f"So $\\boxed{{{g if right(i) else 'x'}}}$.") for i, g in enumerate(gold)], None
    return fake_generate


def test_evaluate_records_and_verdicts(tokenizer, tmp_path, monkeypatch):
    problems = grpo.load_problems("ops-test", limit=6)
    monkeypatch.setattr(eval_math500, "generate", boxed_answers(tokenizer, problems, right=lambda i: i % 2 == 0))
    s = eval_math500.evaluate(None, tokenizer, problems, [tokenizer.eos_token_id], eval_math500.Config(), batch_size=4,
                              out_file=str(tmp_path / "e.jsonl"))
    rows = [json.loads(l) for l in open(tmp_path / "e.jsonl")]
    assert [r["unique_id"] for r in rows] == [p["unique_id"] for p in problems]
    assert set(rows[0]) == {"unique_id", "level", "subject", "problem", "answer", "hl_output", "context",
                            "context_parsed", "ctx_self", "ctx_has_answer", "ctx_right_op", "ctx_good", "response", "extracted",
                            "score"}
    assert s["max_new_tokens"] == 512  # the budget the verdict compares (before_after)
    # batches of 4 and 2 problems: right at rows 0 and 2 of each
    assert [r["score"] for r in rows] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert rows[0]["extracted"] == problems[0]["answer"] and rows[1]["extracted"] == "x"
    assert (s["acc"], s["n"], s["context"]) == (0.5, 6, "none")
    assert (s["ci_low"], s["ci_high"]) == pytest.approx(eval_math500.wilson_interval(3, 6))
    assert all(s[k] is None for k in ("parse_rate", "ctx_self", "ctx_has_answer", "ctx_right_op", "ctx_good"))
    by = {}
    for r in rows:
        by.setdefault(r["subject"], []).append(r["score"])
    assert s["by_subject"] == {x: {"acc": sum(v) / len(v), "n": len(v)} for x, v in sorted(by.items())}
    assert len(s["by_subject"]) > 1 and s["by_level"] == {"None": {"acc": 0.5, "n": 6}}
    assert {"seconds", "by_level", "by_subject"} <= set(s)


def test_evaluate_with_a_stub_hl(tiny_model, tokenizer, tmp_path, monkeypatch):
    problems = grpo.load_problems("ops-test", limit=5)
    stub = ("What is 1 + 1?", "1 + 1 = 2, so $\\boxed{2}$.")

    def stub_contexts(hl_model, tok, batch, n, max_tokens, temperature, eos, seed=None, self_threshold=0.9):
        outputs = [tok.encode("Problem: What is 1 + 1?" if i % 2 == 0 else "oops") for i in range(len(batch))]
        outputs[1] = tok.encode(f"Problem: {batch[1]['problem']}\nSolution: \\boxed{{1}}")  # restates x: dropped
        return [[stub if i % 2 == 0 else None] * n for i in range(len(batch))], None, outputs, {}

    monkeypatch.setattr(eval_math500, "generate_contexts", stub_contexts)
    s = eval_math500.evaluate(tiny_model, tokenizer, problems, [tokenizer.eos_token_id], eval_math500.Config(max_new_tokens=4),
                              hl=object(), batch_size=5, out_file=str(tmp_path / "hl.jsonl"))
    rows = [json.loads(l) for l in open(tmp_path / "hl.jsonl")]
    assert [r["context_parsed"] for r in rows] == [True, True, True, False, True]
    assert [r["ctx_self"] for r in rows] == [False, True, False, False, False] and rows[1]["context"] is None
    assert rows[0]["context"] == grpo.format_context(stub) and rows[3]["hl_output"] == "oops"
    # the stub's context carries the answer 2: a problem whose gold answer is 2 counts as a possible copy
    assert [r["ctx_has_answer"] for r in rows] == [r["context"] is not None and r["answer"] == "2" for r in rows]
    assert s["context"] == "hl" and s["parse_rate"] == pytest.approx(4 / 5) and s["ctx_self"] == pytest.approx(1 / 5)
    assert s["ctx_has_answer"] == pytest.approx(sum(r["ctx_has_answer"] for r in rows) / 5)
    assert s["ctx_right_op"] == 0.0 and s["ctx_good"] == 0.0  # "What is 1 + 1?" is no example of an ops operator


def test_evaluate_with_retrieved_contexts(tiny_model, tokenizer, tmp_path, monkeypatch):
    problems = grpo.load_problems("ops-test", limit=4)
    contexts = retrieve(problems, grpo.load_problems("ops"))
    seen, real = [], eval_math500.format_prompt
    monkeypatch.setattr(eval_math500, "format_prompt", lambda tok, x, c=None: seen.append(c) or real(tok, x, c))
    s = eval_math500.evaluate(tiny_model, tokenizer, problems, [tokenizer.eos_token_id], eval_math500.Config(max_new_tokens=4),
                              batch_size=3, out_file=str(tmp_path / "r.jsonl"), contexts=contexts)
    assert seen == contexts  # each problem's own retrieved example, in order
    assert s["context"] == "given" and s["ctx_has_answer"] == 0.0 and s["parse_rate"] is None
    assert [json.loads(l)["context"] for l in open(tmp_path / "r.jsonl")] == [grpo.format_context(c) for c in contexts]


def test_print_summary():
    s = {"acc": 0.5, "ci_low": 0.25, "ci_high": 0.75, "n": 8, "parse_rate": 0.5, "ctx_self": 0.25,
         "ctx_has_answer": 0.125, "by_level": {"1": {"acc": 0.5, "n": 8}}, "by_subject": {"x": {"acc": 0.5, "n": 8}}}
    lines = []
    eval_math500.print_summary(s, log=lines.append)
    assert lines[0] == ("accuracy 0.500  95% CI [0.250, 0.750]  n = 8 problems  | HL parse rate 0.50, "
                        "restated x 0.25, carried the answer 0.12")
    assert lines[1:] == ["  level    1: 0.50 (8)", "  subject  x: 0.50 (8)"]

# -----------------------------------------------------------------------------
# flags


@pytest.mark.parametrize("argv, message", [(["--limit", "-1"], "^--limit .*must be"),
                                           (["--max-new-tokens", "0"], "^--max-new-tokens .*must be")])
def test_bad_flags_are_named(argv, message):
    with pytest.raises(SystemExit, match=message):
        grpo.parse_config(eval_math500.Config, argv)


# -----------------------------------------------------------------------------
# the report and the plot over run folders


def fake_run(folder, exp, flags, scores, first=0, carried=None, right_op=None, good=None):
    """A run folder as alternate.py writes it: eval.json, the final round's records, metrics.jsonl."""
    folder.mkdir(parents=True)
    n, acc = len(scores), sum(scores) / len(scores)
    ev = {"acc": acc, "ci_low": 0.0, "ci_high": 1.0, "n": n, "rounds": 2, "exp": exp, "flags": flags,
          "parse_rate": None, "ctx_self": None, "ctx_has_answer": carried, "ctx_right_op": right_op,
          "ctx_good": good, "wall_clock": 60}
    (folder / "eval.json").write_text(json.dumps(ev))
    (folder / "eval_round2.jsonl").write_text("".join(json.dumps({"unique_id": f"p{i}", "problem": "", "score": v})
                                                      + "\n" for i, v in enumerate(scores, first)))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "phase": "eval", "eval/acc": 0.125, "eval/ctx_right_op": right_op, "eval/ctx_good": good},
        {"step": 1, "phase": "ll", "ll/acc": 0.25}, {"step": 1, "phase": "ll", "ll/acc": 0.75},
        {"step": 2, "phase": "eval", "eval/acc": acc, "eval/ctx_right_op": right_op, "eval/ctx_good": good}]))
    return str(folder)


def test_report_table_and_over_seeds(tmp_path):
    runs = [fake_run(tmp_path / "a0", 5, "", [1, 1, 0, 0], carried=0.25),
            fake_run(tmp_path / "a1", 5, "seed=1", [1, 0, 0, 0], carried=0.5, right_op=0.75, good=0.5),
            fake_run(tmp_path / "b0", 5, "lam=0.0", [0, 0, 0, 0])]
    lines = []
    eval_math500.report(runs + [str(tmp_path / "missing")], log=lines.append)
    assert lines[0].startswith(f"(skipped {tmp_path / 'missing'}: no valid eval.json")
    assert "| a1 | 5 | seed=1 | 0.125 | 0.250 [0.000, 1.000] | 4 | - | - | 0.50 | 0.75 | 0.50 | 2 | 1.0 min |" in lines
    header = lines.index(next(l for l in lines if l.startswith("| run |")))
    assert "good example" in lines[header] and lines[header].count("|") == lines[header + 1].count("|") == 14
    # over seeds: 0.5 and 0.25, t_{0.975, 1} = 12.706 (clipped to [0, 1])
    assert "| 5 | - | 2 | 0.375 | 0.250 - 0.500 | [0.000, 1.000] |" in lines
    assert "| 5 | lam=0.0 | 1 | 0.000 | 0.000 - 0.000 | - |" in lines


def test_report_interval_over_seeds(tmp_path):
    runs = [fake_run(tmp_path / "same" / f"s{seed}", 3, f"seed={seed}" if seed else "", [1] * right + [0] * (8 - right))
            for seed, right in enumerate([4, 5, 3])]  # accuracies 0.5, 0.625, 0.375 on the same 8 problems
    lines = []
    eval_math500.report(runs, log=lines.append)
    row = next(l for l in lines if l.startswith("| 3 | - | 3 |"))
    # mean 0.5, sd over seeds 0.125, t_{0.975, 2} = 4.303: half-width 4.303 * 0.125 / sqrt(3) = 0.311
    assert "| 0.500 | 0.375 - 0.625 |" in row and "| [0.189, 0.811] |" in row


def test_report_skips_a_torn_eval_json(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eval.json").write_text('{"acc": 0.5, "ci_lo')
    lines = []
    eval_math500.report([str(tmp_path / "run")], log=lines.append)
    assert "no valid eval.json" in lines[0] and str(tmp_path / "run") in lines[0]


def test_plot_draws_one_panel_per_experiment(tmp_path, monkeypatch):
    figure = pytest.importorskip("matplotlib.figure")
    saved, real = [], figure.Figure.savefig
    monkeypatch.setattr(figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig) or real(fig, *a, **k))
    runs = [fake_run(tmp_path / "a0", 5, "", [1, 0], right_op=0.5, good=0.25), fake_run(tmp_path / "a1", 5, "seed=1", [0, 0]),
            fake_run(tmp_path / "b0", 1, "", [1, 1])]
    lines = []
    eval_math500.plot(runs + [str(tmp_path / "missing")], str(tmp_path / "c.png"), log=lines.append)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and "skipped" in lines[0]
    assert lines[-1].endswith("2 experiment(s)")
    assert [len(ax.lines) for ax in saved[0].axes] == [1, 4]  # exp 1: b0's accuracy; exp 5: a0's, its two rates, a1's
    styles = [(line.get_linestyle(), line.get_marker()) for line in saved[0].axes[1].lines]
    assert styles[1:3] == [("--", "x"), (":", "+")]  # right operator, good example


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        eval_math500.plot([str(tmp_path)], str(tmp_path / "c.png"))
    assert not (tmp_path / "c.png").exists()

# -----------------------------------------------------------------------------
# the command line


def script(args, cwd):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval_math500.py")] + args, cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_command_line_evaluates_and_reports(tiny_model_dir, tmp_path):
    out = script(["--model", tiny_model_dir, "--data", "ops-test", "--limit", "3", "--max-new-tokens", "2",
                  "--device", "cpu", "--out", "e/e.jsonl"], tmp_path)
    assert "accuracy" in out and "95% CI" in out
    assert json.load(open(tmp_path / "e" / "e.summary.json"))["n"] == 3
    assert len(open(tmp_path / "e" / "e.jsonl").readlines()) == 3
    fake_run(tmp_path / "r1", 1, "lam=0.0", [1, 0])
    out = script(["--report", str(tmp_path / "r1"), str(tmp_path / "missing")], tmp_path)
    assert "| r1 | 1 | lam=0.0 |" in out and "skipped" in out


def test_evaluate_counts_contexts_of_the_right_operator(tiny_model, tokenizer, tmp_path):
    problems = grpo.load_problems("ops-mix-test", limit=4)
    op = lambda text: text.split()[2]  # "Compute $3 \\star 5$." -> "\\star"
    other = {"\\star": "\\diamond", "\\diamond": "\\star", "\\bullet": "\\star", "\\heartsuit": "\\star"}
    ops = [op(p["problem"]) for p in problems]
    value = {"\\star": 17, "\\diamond": 72, "\\bullet": 1, "\\heartsuit": -1}  # 9 op 8, by hand
    contexts = [(f"Compute $1 {ops[0]} 2$.", ""), (f"Compute $1 {other[ops[1]]} 2$.", ""), None,
                (f"Compute $9 {ops[3]} 8$.", f"$\\boxed{{{value[ops[3]]}}}$")]
    s = eval_math500.evaluate(tiny_model, tokenizer, problems, [tokenizer.eos_token_id], eval_math500.Config(max_new_tokens=2),
                              batch_size=4, out_file=str(tmp_path / "r.jsonl"), contexts=contexts)
    rows = [json.loads(l) for l in open(tmp_path / "r.jsonl")]
    assert [r["ctx_right_op"] for r in rows] == [True, False, False, True]
    assert [r["ctx_good"] for r in rows] == [False, False, False, True]  # the first has no solution
    assert s["ctx_right_op"] == 0.5 and s["ctx_good"] == 0.25 and s["parse_rate"] is None
