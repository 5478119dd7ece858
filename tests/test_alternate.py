"""Tests for alternate.py and eval_math500.py: the five experiments end to end, resume, the ablation
flags reaching what they control, evaluation on MATH-500 problems, the report."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import alternate as alternate_py
import eval_math500
import grpo
from conftest import MATH500

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = ["--batch-problems", "1", "--group-size", "2", "--hl-group", "2", "--max-new-tokens", "6",
        "--max-context-tokens", "48", "--sft-steps", "2", "--sft-batch", "2", "--eval-limit", "3", "--limit", "30",
        "--rounds", "1", "--device", "cpu", "--micro-batch", "4"]


def alternate(args, cwd):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "alternate.py")] + args, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def metrics(folder):
    return [json.loads(l) for l in open(os.path.join(folder, "metrics.jsonl"))]


@pytest.mark.parametrize("exp", [1, 2, 3, 4, 5])
def test_experiment_runs_end_to_end(exp, tiny_model_dir, tmp_path):
    out = alternate(["--exp", str(exp), "--model", tiny_model_dir, "--out", "run"] + TINY, tmp_path)
    rows = metrics(tmp_path / "run")
    phases = {r["phase"] for r in rows}
    assert "eval" in phases and os.path.exists(tmp_path / "run" / "eval.json")
    assert ("ll" in phases) == (exp in (1, 3, 5))
    assert ("hl" in phases) == (exp in (3, 5))
    assert os.path.exists(tmp_path / "run" / "ckpt" / "ll" / "config.json")
    assert os.path.exists(tmp_path / "run" / "hl_sft" / "config.json") == (exp in (4, 5))
    evals = [r for r in rows if r["phase"] == "eval"]
    if exp == 1:
        assert evals[-1]["eval/parse_rate"] is None  # no HL, no context
    else:
        assert 0.0 <= evals[-1]["eval/parse_rate"] <= 1.0
    assert f"experiment {exp}" in out
    assert ("before/after: accuracy" in out) == (exp in (1, 3, 5))  # the line a newcomer reads at the end


def test_resume_continues_the_run(tiny_model_dir, tmp_path):
    alternate(["--model", tiny_model_dir, "--out", "run"] + TINY, tmp_path)
    out = alternate(["--resume", "run", "--rounds", "2"], tmp_path)
    assert "resumed from" in out and "theta_0: the SFT'd HL already in" in out  # SFT is not run again
    rows = metrics(tmp_path / "run")
    assert sorted({r["step"] for r in rows if r["phase"] == "ll"}) == [1, 2]
    assert json.load(open(tmp_path / "run" / "eval.json"))["rounds"] == 2


def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
    alternate(["--model", tiny_model_dir, "--out", "straight", "--lr", "1e-2"] + TINY + ["--rounds", "2"], tmp_path)
    alternate(["--model", tiny_model_dir, "--out", "split", "--lr", "1e-2"] + TINY, tmp_path)
    alternate(["--resume", "split", "--rounds", "2"], tmp_path)
    straight, split = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [(r["step"], r["phase"]) for r in straight] == [(r["step"], r["phase"]) for r in split]
    for a, b in zip(straight, split):
        for key, v in a.items():
            if isinstance(v, float) and not key.endswith(("time", "tok_s", "mem_gb", "wall_clock", "seconds")):
                assert b[key] == pytest.approx(v, rel=1e-5, abs=1e-7, nan_ok=True), key


def test_time_left_leaves_the_evaluations_out(tiny_model_dir, tmp_path, monkeypatch, capsys):
    clock, real = [0.0], alternate_py.evaluate

    def now():  # alternate.py's clock: a millisecond per look, so the test does not depend on this machine's load
        clock[0] += 0.001
        return clock[0]

    def slow_evaluate(*a, **k):  # an evaluation that takes 1,000 s on that clock
        clock[0] += 1000
        return real(*a, **k)

    monkeypatch.setattr(alternate_py, "time", SimpleNamespace(time=now))
    monkeypatch.setattr(alternate_py, "evaluate", slow_evaluate)
    monkeypatch.chdir(tmp_path)
    alternate_py.main(grpo.parse_config(alternate_py.Config, ["--model", tiny_model_dir, "--out", "eta"] + TINY))
    first = next(l for l in capsys.readouterr().out.splitlines() if "of training steps left" in l)
    left = float(first.split("~")[1].split("s")[0])  # after 1 of 3 steps: 2 steps' time, no evaluation in it
    assert left < 1000, f"the round-0 evaluation was counted as training time: {first}"


def test_training_problems_never_include_evaluation_problems(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "alternate.py"), "--model", tiny_model_dir,
                           "--data", "arith", "--eval-data", "arith"] + TINY, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "every training problem is also an evaluation problem" in proc.stderr
    train = tmp_path / "train.jsonl"  # 3 MATH-500 problems slipped into a training file
    rows = grpo.load_problems(MATH500, limit=8)
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:3] + [{"problem": "What is 1 + 1?", "answer": "2"}]))
    out = alternate(["--exp", "1", "--model", tiny_model_dir, "--data", str(train), "--eval-data", MATH500, "--out", "h"]
                    + TINY, tmp_path)
    assert "3 of 4 removed as evaluation problems" in out


def test_ablation_flags_reach_their_functions(tiny_model_dir, tmp_path):
    alternate(["--model", tiny_model_dir, "--out", "abl", "--lam", "0", "--alpha", "0", "--beta-hl", "0"] + TINY,
              tmp_path)
    rows = metrics(tmp_path / "abl")
    ll = [r for r in rows if r["phase"] == "ll"]
    hl = [r for r in rows if r["phase"] == "hl"]
    # lambda = 0: no shaping (a random tiny HL writes no parseable context, so the shaping's effect with
    # contexts is tested in test_context_grpo.py; here: the flag reaches the LL step)
    assert ll and all(r["ll/reward"] == r["ll/reward_task"] for r in ll)
    assert json.load(open(tmp_path / "abl" / "config.json"))["lam"] == 0.0
    assert hl and all(r["hl/reward"] == pytest.approx(r["hl/acc"]) for r in hl)  # alpha = 0: R_HL = R_task
    assert all(r["hl/kl"] == 0.0 for r in hl)                              # beta_HL = 0: no KL to pi_SFT


def test_frozen_ll_keeps_its_weights(tiny_model_dir, tmp_path):
    alternate(["--model", tiny_model_dir, "--out", "frozen", "--frozen-ll"] + TINY, tmp_path)
    rows = metrics(tmp_path / "frozen")
    assert not [r for r in rows if r["phase"] == "ll"] and [r for r in rows if r["phase"] == "hl"]
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    after = load_file(str(tmp_path / "frozen" / "ckpt" / "ll" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in after)


def test_joint_mode_does_one_combined_step(tiny_model_dir, tmp_path):
    alternate(["--model", tiny_model_dir, "--out", "joint", "--joint", "--ll-steps", "1"] + TINY, tmp_path)
    rows = metrics(tmp_path / "joint")
    ll = [r for r in rows if r["phase"] == "ll"]
    assert len(ll) == 1 and "ll/hl_loss" in ll[0] and "ll/hl_reward" in ll[0]
    assert not [r for r in rows if r["phase"] == "hl"]


def test_contradictory_flags_get_a_clear_message(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "alternate.py"), "--exp", "1", "--joint",
                           "--model", tiny_model_dir], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--hl none" in proc.stderr


@pytest.mark.parametrize("exp", [2, 4])
def test_a_frozen_ll_experiment_refuses_ll_steps(exp):
    with pytest.raises(SystemExit, match=f"--exp {exp} keeps the LL frozen"):
        grpo.parse_config(alternate_py.Config, ["--exp", str(exp), "--ll-steps", "4"])
    grpo.parse_config(alternate_py.Config, ["--exp", str(exp), "--ll-steps", "0"])  # stating the default is fine


@pytest.mark.parametrize("argv, flags", [
    ([], ""),                                                   # steps, eval_data, context: derived, not flags
    (["--ll-steps", "4", "--seed", "1"], "seed=1, ll_steps=4"),  # not steps=8
    (["--data", "arith"], "data=arith"),                         # not eval_data=arith-test
    (["--data", "arith", "--eval-data", "ops-test"], "data=arith, eval_data=ops-test"),
    (["--exp", "4", "--lam", "0"], "lam=0.0"),
    (["--overwrite", "--out", "runs/x"], ""),                    # where a run goes is not what it is
])
def test_changed_flags_are_what_the_user_set(argv, flags):
    cfg = grpo.parse_config(alternate_py.Config, argv)
    assert alternate_py.changed_flags(replace(cfg, **alternate_py.experiment_defaults(cfg))) == flags

# -----------------------------------------------------------------------------
# eval_math500


def test_wilson_interval():
    lo, hi = eval_math500.wilson_interval(0, 5)
    assert lo == 0.0 and hi == pytest.approx(0.4345, abs=1e-4)  # not the point [0, 0] of the normal interval
    lo, hi = eval_math500.wilson_interval(50, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))


def test_accuracy_interval_over_several_answers():
    # every answer wrong: the normal interval would be the point [0, 0]; Wilson's over the 416 answers is not
    mean, lo, hi = eval_math500.accuracy_interval([0.0] * 208, 2)
    assert (mean, lo) == (0.0, 0.0) and hi == pytest.approx(eval_math500.wilson_interval(0, 416)[1]) and hi > 0.009
    # answers that agree within each problem: the normal interval over problems is the wider, and it is kept
    scores = [1.0] * 30 + [0.0] * 70
    mean, lo, hi = eval_math500.accuracy_interval(scores, 4)
    half = 1.96 * (sum((s - 0.3) ** 2 for s in scores) / 99) ** 0.5 / 10
    assert mean == pytest.approx(0.3) and (lo, hi) == (pytest.approx(0.3 - half), pytest.approx(0.3 + half))
    assert hi - lo > eval_math500.wilson_interval(120, 400)[1] - eval_math500.wilson_interval(120, 400)[0]


@pytest.mark.skipif(not os.path.exists(MATH500), reason="../shared/data absent")
def test_eval_on_math500_with_and_without_a_stub_hl(tiny_model, tokenizer, tmp_path, monkeypatch):
    problems = grpo.load_problems(MATH500, limit=5)
    eos = [tokenizer.eos_token_id]
    plain = eval_math500.evaluate(tiny_model, tokenizer, problems, eos, max_new_tokens=6, batch_size=2,
                                  out_file=str(tmp_path / "plain.jsonl"), log=lambda *_: None)
    assert plain["n"] == 5 and plain["parse_rate"] is None and 0 <= plain["ci_low"] <= plain["acc"] <= plain["ci_high"]
    assert set(plain["by_level"]) == {str(p["level"]) for p in problems}
    stub = ("What is 1 + 1?", "1 + 1 = 2, so $\\boxed{2}$.")

    def stub_contexts(hl_model, tok, batch, n, max_tokens, temperature, eos, seed=None, self_threshold=0.9):
        outputs = [tok.encode("Problem: What is 1 + 1?") if i % 2 == 0 else tok.encode("oops") for i in range(len(batch))]
        outputs[1] = tok.encode(f"Problem: {batch[1]['problem']}\nSolution: \\boxed{{1}}")  # restates x: dropped
        return [[stub if i % 2 == 0 else None] * n for i in range(len(batch))], None, outputs, {}

    monkeypatch.setattr(eval_math500, "generate_contexts", stub_contexts)
    with_hl = eval_math500.evaluate(tiny_model, tokenizer, problems, eos, hl_model=object(), max_new_tokens=6,
                                    batch_size=5, out_file=str(tmp_path / "hl.jsonl"), log=lambda *_: None)
    assert with_hl["parse_rate"] == pytest.approx(4 / 5) and with_hl["ctx_self"] == pytest.approx(1 / 5)
    rows = [json.loads(l) for l in open(tmp_path / "hl.jsonl")]
    assert [r["context_parsed"] for r in rows] == [True, True, True, False, True]
    assert [r["ctx_self"] for r in rows] == [False, True, False, False, False] and rows[1]["context"] is None
    assert rows[0]["context"].startswith("Problem: What is 1 + 1?") and rows[3]["hl_output"] == "oops"
    # the stub's context carries the answer 2: a problem whose gold answer is 2 counts as a possible copy
    assert [r["ctx_has_answer"] for r in rows] == [r["context"] is not None and r["answer"] == "2" for r in rows]
    assert with_hl["ctx_has_answer"] == pytest.approx(sum(r["ctx_has_answer"] for r in rows) / 5)
    assert {"responses", "extracted", "verdicts", "score", "unique_id"} <= set(rows[0])


def test_eval_with_retrieved_contexts(tiny_model, tokenizer, tmp_path, monkeypatch):
    problems = grpo.load_problems("ops-test", limit=4)
    contexts = grpo.retrieve(problems, grpo.load_problems("ops"))
    seen = []
    real = eval_math500.format_prompt
    monkeypatch.setattr(eval_math500, "format_prompt", lambda tok, x, c=None: seen.append(c) or real(tok, x, c))
    s = eval_math500.evaluate(tiny_model, tokenizer, problems, [tokenizer.eos_token_id], max_new_tokens=4,
                              batch_size=3, out_file=str(tmp_path / "r.jsonl"), log=lambda *_: None, contexts=contexts)
    assert seen == contexts                                    # each problem's own retrieved example, in order
    assert s["context"] == "retrieved" and s["ctx_has_answer"] == 0.0 and s["parse_rate"] is None
    rows = [json.loads(l) for l in open(tmp_path / "r.jsonl")]
    assert [r["context"] for r in rows] == [grpo.format_context(c) for c in contexts]


@pytest.mark.parametrize("argv, message", [(["--context", "hl"], "HL contexts need an HL"),
                                           (["--context", "retrieved", "--hl-model", "smollm2"], "HL contexts need"),
                                           (["--pool", "ops"], "--pool is only used with --context retrieved"),
                                           (["--context", "retrieved", "--data", "math500"], "pass --pool")])
def test_eval_context_flags(argv, message):
    with pytest.raises(SystemExit, match=message):
        grpo.parse_config(eval_math500.Config, argv)


def test_eval_retrieved_pool_defaults_to_the_training_split():
    cfg = grpo.parse_config(eval_math500.Config, ["--context", "retrieved", "--data", "ops-test"])
    assert cfg.pool == "ops"


def _fake_run(folder, exp, flags, scores, first=0):
    folder.mkdir()
    n, acc = len(scores), sum(scores) / len(scores)
    ev = {"acc": acc, "ci_low": 0.0, "ci_high": 1.0, "n": n, "rounds": 2, "exp": exp, "flags": flags,
          "parse_rate": None, "ctx_self": None, "ctx_has_answer": None, "wall_clock": 60}
    (folder / "eval.json").write_text(json.dumps(ev))
    (folder / "eval_round2.jsonl").write_text("".join(json.dumps({"unique_id": f"p{i}", "problem": "", "score": v}) + "\n"
                                                      for i, v in enumerate(scores, first)))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "phase": "eval", "eval/acc": 0.0}, {"step": 1, "phase": "ll", "ll/acc": 0.25},
        {"step": 1, "phase": "ll", "ll/acc": 0.75}, {"step": 2, "phase": "eval", "eval/acc": acc}]))


def test_report_over_seeds(tmp_path):
    _fake_run(tmp_path / "a0", 5, "", [1, 1, 0, 0])
    _fake_run(tmp_path / "a1", 5, "seed=1", [1, 0, 0, 0])
    _fake_run(tmp_path / "b0", 5, "lam=0.0", [0, 0, 0, 0])
    lines = []
    eval_math500.report([str(tmp_path / f) for f in ("a0", "a1", "b0")], log=lines.append)
    row = next(l for l in lines if l.startswith("| 5 | - | 2 |"))
    # per-problem means over the two seeds: 1, 0.5, 0, 0 -> mean 0.375, sd 0.479, half-width 1.96 * 0.479 / 2
    assert "| 0.375 | 0.250 - 0.500 | [0.000, 0.844] |" in row
    assert any(l.startswith("| 5 | lam=0.0 | 1 |") for l in lines)


def test_report_pools_seeds_only_over_the_same_problems(tmp_path):
    for seed in (0, 1):  # two folders with the same name: runs/s0/exp5, runs/s1/exp5
        (tmp_path / f"s{seed}").mkdir()
        _fake_run(tmp_path / f"s{seed}" / "exp5", 5, f"seed={seed}" if seed else "", [0] * 16, first=15 * seed)
    lines = []
    eval_math500.report([str(tmp_path / f"s{seed}" / "exp5") for seed in (0, 1)], log=lines.append)
    assert not any(l.startswith("| 5 | - | 2 |") for l in lines), "answers to different problems were pooled"
    assert any("not pooled over seeds" in l and "different problems" in l for l in lines)


def test_every_seed_evaluates_the_problems_eval_math500_does(tiny_model_dir, tmp_path):
    for seed in (0, 1):
        alternate(["--exp", "1", "--ll-steps", "0", "--model", tiny_model_dir, "--seed", str(seed), "--out", f"s{seed}",
                   "--eval-limit", "8", "--max-new-tokens", "2", "--device", "cpu"], tmp_path)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval_math500.py"), "--model", tiny_model_dir, "--data",
                           "ops-test", "--limit", "8", "--max-new-tokens", "2", "--out", "e.jsonl", "--device", "cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = [[json.loads(l)["unique_id"] for l in open(tmp_path / f)] for f in ("s0/eval_round0.jsonl",
                                                                              "s1/eval_round0.jsonl", "e.jsonl")]
    assert ids[0] == ids[1], "two seeds of one run were evaluated on different problems"
    assert ids[0] == ids[2], "alternate.py --eval-limit N and eval_math500.py --limit N evaluate different problems"


def test_older_runs_group_with_newer_ones(tmp_path):
    # the same experiment recorded by three vintages of alternate.py: with the derived steps= and overwrite=,
    # with --data ops from when it was not the default, with --eval-data at --data's test split; --eval-data
    # elsewhere is a flag of its own
    _fake_run(tmp_path / "s0", 5, "data=ops, steps=8, lam=0.0, eval_data=ops-test", [1, 0])
    _fake_run(tmp_path / "s1", 5, "seed=1, overwrite=True, lam=0.0, eval_data=ops-test", [1, 1])
    _fake_run(tmp_path / "s2", 5, "seed=2, lam=0.0", [0, 0])
    _fake_run(tmp_path / "m0", 5, "lam=0.0, eval_data=math500", [0, 0])
    _fake_run(tmp_path / "a0", 5, "data=arith, lam=0.0, eval_data=arith-test", [0, 0])
    lines = []
    eval_math500.report([str(tmp_path / f) for f in ("s0", "s1", "s2", "m0", "a0")], log=lines.append)
    assert any(l.startswith("| 5 | lam=0.0 | 3 |") for l in lines)
    assert any(l.startswith("| 5 | lam=0.0, eval_data=math500 | 1 |") for l in lines)
    assert any(l.startswith("| 5 | data=arith, lam=0.0 | 1 |") for l in lines)


def test_report_interval_over_seeds(tmp_path):
    for seed, right in enumerate([4, 5, 3]):  # accuracies 0.5, 0.625, 0.375 on 8 problems
        _fake_run(tmp_path / f"s{seed}", 5, f"seed={seed}" if seed else "", [1] * right + [0] * (8 - right))
    lines = []
    eval_math500.report([str(tmp_path / f"s{seed}") for seed in range(3)], log=lines.append)
    row = next(l for l in lines if l.startswith("| 5 | - | 3 |"))
    # mean 0.5, sd over seeds 0.125, t_{0.975, 2} = 4.303: half-width 4.303 * 0.125 / sqrt(3) = 0.311
    assert "| 0.500 | 0.375 - 0.625 |" in row and "| [0.189, 0.811] |" in row
    assert eval_math500.seeds_interval([0.3]) is None


@pytest.mark.parametrize("df, exact", [(1, 12.706), (10, 2.228), (11, 2.201), (20, 2.086), (30, 2.042), (1000, 1.962)])
def test_t_quantile(df, exact):
    assert eval_math500.t975(df) == pytest.approx(exact, abs=0.003)


def test_plot_draws_one_panel_per_experiment(tmp_path):
    pytest.importorskip("matplotlib")
    _fake_run(tmp_path / "a0", 5, "", [1, 0])
    _fake_run(tmp_path / "a1", 5, "seed=1", [0, 0])
    _fake_run(tmp_path / "b0", 1, "", [1, 1])
    lines = []
    eval_math500.plot([str(tmp_path / f) for f in ("a0", "a1", "b0", "missing")], str(tmp_path / "c.png"), log=lines.append)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and "skipped" in lines[0]
    assert lines[-1].endswith("2 experiment(s), 3 run(s)")


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        eval_math500.plot([str(tmp_path)], str(tmp_path / "c.png"))
    assert not (tmp_path / "c.png").exists()


def test_report_table(tiny_model_dir, tmp_path):
    alternate(["--exp", "1", "--model", tiny_model_dir, "--out", "r1", "--lam", "0"] + TINY, tmp_path)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval_math500.py"), "--report", str(tmp_path / "r1"),
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| r1 | 1 |" in proc.stdout and "lam=0.0" in proc.stdout and "skipped" in proc.stdout
