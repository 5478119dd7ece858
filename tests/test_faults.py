"""Bad input and faults, as a new user meets them: flags out of range, bad data, bad model folders, resumes
that would change the experiment, a kill at the wrong moment, a re-run into a finished folder. Each gets a
clear message before any work starts, or a recovery; never a crash deep in a stack or lost work."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import alternate
import eval_math500
import grpo
from conftest import make_tiny_model

ROOT = os.path.join(os.path.dirname(__file__), "..")

# -----------------------------------------------------------------------------
# flags: checked by parse_config (Config.check), before any data or model is loaded


@pytest.mark.parametrize("cls, argv, flag", [
    (grpo.Config, ["--max-new-tokens", "0"], "--max-new-tokens"),
    (grpo.Config, ["--group-size", "0"], "--group-size"),
    (grpo.Config, ["--group-size", "1"], "--group-size"),          # every advantage would be 0
    (grpo.Config, ["--batch-problems", "0"], "--batch-problems"),
    (grpo.Config, ["--micro-batch", "-1"], "--micro-batch"),
    (grpo.Config, ["--updates", "0"], "--updates"),
    (grpo.Config, ["--lr", "-1"], "--lr"),
    (grpo.Config, ["--temperature", "-1"], "--temperature"),
    (grpo.Config, ["--save-every", "-1"], "--save-every"),
    (grpo.Config, ["--limit", "-1"], "--limit"),
    (alternate.Config, ["--tau", "0"], "--tau"),
    (alternate.Config, ["--tau", "-1"], "--tau"),
    (alternate.Config, ["--hl-group", "1"], "--hl-group"),
    (alternate.Config, ["--self-threshold", "1.5"], "--self-threshold"),
    (alternate.Config, ["--eval-limit", "-1"], "--eval-limit"),
    (alternate.Config, ["--rounds", "0"], "--rounds"),
    (eval_math500.Config, ["--max-new-tokens", "0"], "--max-new-tokens"),
    (eval_math500.Config, ["--limit", "-1"], "--limit"),
])
def test_out_of_range_flags_get_a_message_naming_the_flag_and_range(cls, argv, flag):
    with pytest.raises(SystemExit, match=f"^{flag} .*must be"):
        grpo.parse_config(cls, argv)


def test_icpo_keeps_one_on_policy_row():
    with pytest.raises(SystemExit, match="--n-off"):
        grpo.parse_config(alternate.Config, ["--icpo", "--group-size", "4", "--n-off", "4"])


def test_save_every_zero_means_only_at_the_end(monkeypatch, tmp_path, tiny_model_dir):
    saved = []
    monkeypatch.setattr(grpo, "save_checkpoint", lambda out, step, *a: saved.append(step))
    cfg = replace(grpo.Config(), model=tiny_model_dir, steps=3, save_every=0, batch_problems=1, group_size=2,
                  max_new_tokens=2, out=str(tmp_path / "run"), device="cpu")
    grpo.main(cfg)
    assert saved == [3]

# -----------------------------------------------------------------------------
# data


def test_data_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"problem": "1+1?", "answer": "2"}\n{"problem": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(ValueError, match="latin1.jsonl:2: not a UTF-8 JSON line"):
        grpo.load_problems(str(path))
    with pytest.raises(SystemExit, match="no data file at"):
        grpo.load_problems(str(tmp_path))
    path.write_text('{"problem": "What is 1 - 1?", "answer": 0}\n{"problem": "x", "answer": ""}\n')
    assert grpo.load_problems(str(path), limit=1)[0]["answer"] == "0"  # a falsy number is an answer
    with pytest.raises(ValueError, match=":2: no 'answer'"):
        grpo.load_problems(str(path))                                # an empty one is missing


def test_bad_data_stops_before_the_run_folder_is_touched(tmp_path):
    run = tmp_path / "finished"
    run.mkdir()
    (run / "config.json").write_text('{"script": "grpo.py", "steps": 6}')
    cfg = replace(grpo.Config(), data=str(tmp_path / "nope.jsonl"), out=str(run), resume=str(run))
    with pytest.raises(SystemExit, match="no data file at"):
        grpo.main(cfg)
    assert json.load(open(run / "config.json")) == {"script": "grpo.py", "steps": 6}  # not rewritten

# -----------------------------------------------------------------------------
# models


def test_bad_model_names_and_folders(tmp_path, tiny_model_dir):
    with pytest.raises(SystemExit, match="^--hl-init /nonexistent: could not load a model"):
        grpo.load_model("/nonexistent", "cpu", flag="--hl-init")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="^--model .*empty: could not load a model"):
        grpo.load_model(str(tmp_path / "empty"), "cpu")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(SystemExit, match=r"^--model .*corrupt: could not load a model"):
        grpo.load_model(str(corrupt), device="cpu")

# -----------------------------------------------------------------------------
# resume: the same script, the same experiment; what may change takes effect


def test_resume_refuses_another_scripts_folder_and_fixed_flags(tmp_path):
    run = tmp_path / "grpo_run"
    run.mkdir()
    saved = {"script": "grpo.py", **vars(grpo.Config(out=str(run)))}
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="made by grpo.py, not alternate.py"):
        grpo.parse_config(alternate.Config, ["--resume", str(run)])
    assert json.load(open(run / "config.json")) == saved
    with pytest.raises(SystemExit, match="^--group-size 4: cannot change on resume"):
        grpo.parse_config(grpo.Config, ["--resume", str(run), "--group-size", "4"])
    exp5 = tmp_path / "exp5"
    exp5.mkdir()
    (exp5 / "config.json").write_text(json.dumps({"script": "alternate.py", **vars(alternate.Config(out=str(exp5)))}))
    with pytest.raises(SystemExit, match="^--exp 1: cannot change on resume"):
        grpo.parse_config(alternate.Config, ["--resume", str(exp5), "--exp", "1"])
    cfg = grpo.parse_config(grpo.Config, ["--resume", str(run), "--steps", "40", "--lr", "1e-4"])
    assert (cfg.steps, cfg.lr) == (40, 1e-4)


def test_resumed_lr_takes_effect(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    grpo.save_checkpoint(str(tmp_path), 3, {"policy": model}, {"policy": opt}, tokenizer)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-4)  # built from the resumed --lr
    assert grpo.load_checkpoint(str(tmp_path), {"policy": model}, {"policy": opt2}) == 3
    assert opt2.param_groups[0]["lr"] == 1e-4 and opt2.state  # the new lr, the saved moments

# -----------------------------------------------------------------------------
# lost or duplicated work


def test_a_new_run_into_a_run_folder_needs_overwrite(tmp_path):
    cfg = replace(grpo.Config(), out=str(tmp_path / "run"))
    grpo.start_run(cfg)
    grpo.log_jsonl(cfg.out, "metrics.jsonl", {"step": 1})
    os.makedirs(os.path.join(cfg.out, "ckpt"))
    with pytest.raises(SystemExit, match="already holds a run"):
        grpo.start_run(cfg)
    grpo.start_run(replace(cfg, overwrite=True))
    assert sorted(os.listdir(cfg.out)) == ["config.json"]  # the old metrics and checkpoint are gone


def test_resume_without_a_checkpoint_drops_the_metrics_of_the_lost_steps(tmp_path):
    for step in (0, 1, 2):  # killed at step 2, before the first checkpoint (step 0: alternate's round-0 eval)
        grpo.log_jsonl(str(tmp_path), "metrics.jsonl", {"step": step})
    assert grpo.load_checkpoint(str(tmp_path), {}, {}) == 0
    assert [r["step"] for r in grpo.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [0]


def test_a_kill_mid_save_leaves_a_checkpoint_that_loads_whole(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    grpo.save_checkpoint(str(tmp_path), 4, {"policy": model}, {"policy": opt}, tokenizer)
    shutil.copytree(tmp_path / "ckpt", tmp_path / "ckpt.tmp")
    os.remove(tmp_path / "ckpt.tmp" / "state.pt")                 # killed while writing step 6: ckpt/ is step 4's
    assert grpo.load_checkpoint(str(tmp_path), {"policy": model}, {"policy": opt}) == 4
    grpo.save_checkpoint(str(tmp_path), 6, {"policy": model}, {"policy": opt}, tokenizer)
    os.replace(tmp_path / "ckpt", tmp_path / "ckpt.tmp")          # killed between the delete and the rename
    assert grpo.load_checkpoint(str(tmp_path), {"policy": model}, {"policy": opt}) == 6
    grpo.save_checkpoint(str(tmp_path), 8, {"policy": model}, {"policy": opt}, tokenizer)
    shutil.copytree(tmp_path / "ckpt", tmp_path / "ckpt.tmp")     # step 8 written whole; then killed inside the delete
    os.remove(tmp_path / "ckpt" / "state.pt")                     # of the previous ckpt/ (state.pt goes first) ...
    shutil.rmtree(tmp_path / "ckpt" / "policy")                   # ... with a model folder already gone
    assert grpo.load_checkpoint(str(tmp_path), {"policy": model}, {"policy": opt}) == 8


def test_torn_last_line_is_skipped_and_a_bad_middle_line_named(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "acc')
    assert [r["step"] for r in grpo.read_jsonl(str(path))] == [1, 2]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(SystemExit, match="metrics.jsonl:2"):
        grpo.read_jsonl(str(path))
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_text('{"acc": 0.5, "ci_lo')
    lines = []
    eval_math500.report([str(run)], log=lines.append)
    assert "skipped" in lines[0] and "eval.json" in lines[0]

# -----------------------------------------------------------------------------
# --help


@pytest.mark.parametrize("script, expected", [("alternate.py", "experiment 1-5"),
                                              ("eval_math500.py", "--report"), ("grpo.py", "(default: 30)")])
def test_help(script, expected):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and expected in proc.stdout
