"""Tests for alternate.py: the five experiments end to end,
resume, the ablation flags and the contexts without an HL, the evaluation set it shares with eval_math500.py."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import alternate as alternate_py
import grpo
from conftest import MATH500

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = ["--batch-problems", "1", "--group-size", "2", "--hl-group", "2", "--max-new-tokens", "6",
        "--max-context-tokens", "48", "--sft-steps", "2", "--sft-batch", "2", "--eval-limit", "3", "--limit", "30",
        "--rounds", "1", "--device", "cpu", "--micro-batch", "4", "--eval-every", "1"]


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
    if exp in (1, 3, 5):  # ... with both intervals and what they show
        line = next(l for l in out.splitlines() if l.startswith("before/after"))
        low, high = evals[-1]["eval/ci_low"], evals[0]["eval/ci_high"]
        assert f"{high:.3f}]" in line and f"[{low:.3f}" in line
        assert ("a gain: intervals apart" if low > high else "intervals overlap") in line


def test_resume_continues_the_run(tiny_model_dir, tmp_path):
    alternate(["--model", tiny_model_dir, "--out", "run"] + TINY, tmp_path)
    out = alternate(["--resume", "run", "--rounds", "2"], tmp_path)
    theta_0 = next(l for l in out.splitlines() if l.startswith("theta_0: "))
    assert "resumed from" in out and theta_0.endswith("hl_sft")  # the SFT'd HL reused: SFT is not run again
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


def test_hl_first_rounds_have_the_hl_phase_alone(tiny_model_dir, tmp_path):
    """--hl-first 1: round 1 has no LL step; ICPO's bonus anneals over the 4 LL steps taken, beta_E (1 - t/4)."""
    extra = ["--icpo", "--hl-first", "1", "--rounds", "3", "--ll-steps", "2", "--eval-every", "3"]
    alternate(["--model", tiny_model_dir, "--out", "run"] + TINY + extra, tmp_path)
    rows = metrics(tmp_path / "run")
    assert sorted({r["step"] for r in rows if r["phase"] == "ll"}) == [2, 3]
    assert sorted({r["step"] for r in rows if r["phase"] == "hl"}) == [1, 2, 3]
    assert [r["ll/bonus"] for r in rows if r["phase"] == "ll"] == pytest.approx([0.5, 0.375, 0.25, 0.125])


def test_training_problems_never_include_evaluation_problems(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "alternate.py"), "--model", tiny_model_dir,
                           "--data", "ops", "--eval-data", "ops"] + TINY, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "every training problem is held out" in proc.stderr
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
    assert ll and all(r["ll/reward"] == r["ll/acc"] for r in ll)
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
    (["--ll-steps", "3", "--seed", "1"], "seed=1, ll_steps=3"),  # not steps=6
    (["--data", "x.jsonl"], "data=x.jsonl"),                     # not eval_data=math500, its default
    (["--eval-data", "x.jsonl"], "eval_data=x.jsonl"),
    (["--exp", "4", "--lam", "0"], "lam=0.0"),
    (["--overwrite", "--out", "runs/x"], ""),                    # where a run goes is not what it is
])
def test_changed_flags_are_what_the_user_set(argv, flags):
    cfg = grpo.parse_config(alternate_py.Config, argv)
    assert alternate_py.changed_flags(replace(cfg, **alternate_py.experiment_defaults(cfg))) == flags

# -----------------------------------------------------------------------------
# with eval_math500.py


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


def test_report_table(tiny_model_dir, tmp_path):
    alternate(["--exp", "1", "--model", tiny_model_dir, "--out", "r1", "--lam", "0"] + TINY, tmp_path)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval_math500.py"), "--report", str(tmp_path / "r1"),
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| r1 | 1 |" in proc.stdout and "lam=0.0" in proc.stdout and "skipped" in proc.stdout
