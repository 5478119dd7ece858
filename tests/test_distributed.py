"""Data parallelism, the gradient half (grpo.average_gradients): an update whose rows are split over 2 gloo
ranks on the CPU gives the parameters of one process doing that update on all rows."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import eval_math500
import grpo
import hl_generator
from conftest import make_tiny_model

ROOT = os.path.join(os.path.dirname(__file__), "..")
CASES = [("seq", 1), ("token", 1), ("seq", 2)]  # loss normalisation, optimiser steps per batch


def rollouts(tokenizer):
    """8 fixed rows, problem-major (4 problems x 2), with completions of different lengths."""
    problems = ["What is 2 + 3?", "Compute 7 - 4.", "What is 6 * 7?", "Name a prime number below 10."]
    rows = [grpo.encode(tokenizer, grpo.format_prompt(tokenizer, p)) for p in problems for _ in range(2)]
    comps = [[5 + i, 6, 7, 8][:1 + i % 4] for i in range(8)]
    return rows, comps, torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.25])  # rewards


def updates(tokenizer, rows, comps, rewards):
    """Parameters after each case's update, on these rows (a rank's share, or all of them)."""
    out = {}
    for norm, steps in CASES:
        model = make_tiny_model(tokenizer, seed=1)
        cfg = SimpleNamespace(micro_batch=3, updates=steps, clip_eps=0.2, loss_norm=norm, grad_clip=1.0,
                              scale_by_std=False, beta_hl=0.1, max_context_tokens=4, hl_temperature=1.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)  # SGD: the parameters move by the gradient itself
        adv = grpo.group_advantages(rewards, 2)
        grpo.policy_update(model, grpo.frozen_copy(model), opt, rows, comps, adv, cfg, 0.1, 4, 1.0)
        out[f"ll-{norm}-{steps}"] = torch.cat([p.detach().flatten() for p in model.parameters()])
    model = make_tiny_model(tokenizer, seed=2)  # the HL update: the same function at the HL's settings
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hl_generator.hl_update(model, grpo.frozen_copy(model), opt, rows, comps, rewards, cfg, 2)
    out["hl"] = torch.cat([p.detach().flatten() for p in model.parameters()])
    return out


def sft_and_eval(tokenizer, folder):
    """What takes the WHOLE batch on every rank and splits it itself: one SFT step (returns its loss, and the
    parameters after it) and a greedy evaluation of 5 problems (an uneven split: 3 + 2), its records gathered."""
    rows, comps, _ = rollouts(tokenizer)
    model = make_tiny_model(tokenizer, seed=3)
    targets = sorted(comps, key=len)  # 6 target tokens on rank 0, 14 on rank 1: a mean per rank would not do
    loss = hl_generator.sft_step(model, torch.optim.SGD(model.parameters(), lr=0.5), rows, targets)
    problems = [{"problem": f"What is {a} + {a + 1}?", "answer": str(2 * a + 1)} for a in range(5)]
    summary = eval_math500.evaluate(make_tiny_model(tokenizer, seed=4), tokenizer, problems, [tokenizer.eos_token_id],
                                    eval_math500.Config(max_new_tokens=5), batch_size=2,
                                    out_file=os.path.join(folder, "eval.jsonl"))
    grpo.barrier()  # rank 0 writes the file: read it once it is whole
    return {"sft": torch.cat([p.detach().flatten() for p in model.parameters()]), "sft_loss": loss,
            "n": summary["n"], "responses": [json.loads(l)["response"] for l in open(os.path.join(folder, "eval.jsonl"))]}


def _rank(rank, world, store, folder, tokenizer):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows, comps, rewards = rollouts(tokenizer)
    share = slice(rank * len(rows) // world, (rank + 1) * len(rows) // world)  # whole groups: 2 problems each
    out = updates(tokenizer, rows[share], comps[share], rewards[share])
    out.update(sft_and_eval(tokenizer, os.path.join(folder, "dp")))
    record = {"step": 3, "acc": [0.5, 0.25][rank], "acc_ctx": [float("nan"), 1.0][rank], "accepted": 10,
              "time": [1.0, 2.0][rank]}
    if rank == 1:
        record["util"] = 0.3  # rank 0 had no context: no utilisation to log
    out["record"] = grpo.reduce_record(record)
    torch.save(out, os.path.join(folder, f"{rank}.pt"))
    dist.destroy_process_group()


def test_update_split_over_two_ranks_equals_one_process(tokenizer, tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), str(tmp_path), tokenizer), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    alone = updates(tokenizer, *rollouts(tokenizer))
    start = torch.cat([p.detach().flatten() for p in make_tiny_model(tokenizer, seed=1).parameters()])
    for key, want in alone.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # the ranks stay identical
        assert torch.allclose(ranks[0][key], want, atol=1e-6), (key, (ranks[0][key] - want).abs().max())
    assert not torch.allclose(alone["ll-seq-1"], start)  # the update moved the weights: the comparison means something
    # one rank's half alone (no averaging) would not match: what the all-reduce is for
    half = updates(tokenizer, *[x[:4] for x in rollouts(tokenizer)])
    assert not torch.allclose(half["ll-seq-1"], alone["ll-seq-1"], atol=1e-6)
    # SFT and evaluation split the whole batch themselves: the same parameters, loss and records as one process
    one = sft_and_eval(tokenizer, str(tmp_path / "one"))
    assert torch.equal(ranks[0]["sft"], ranks[1]["sft"])
    assert torch.allclose(ranks[0]["sft"], one["sft"], atol=1e-6), (ranks[0]["sft"] - one["sft"]).abs().max()
    assert not torch.allclose(one["sft"], torch.cat([p.detach().flatten() for p in
                                                      make_tiny_model(tokenizer, seed=3).parameters()]))
    assert ranks[0]["sft_loss"] == pytest.approx(one["sft_loss"], rel=1e-5) == ranks[1]["sft_loss"]
    assert ranks[0]["n"] == ranks[1]["n"] == one["n"] == 5  # every rank's summary counts all the problems
    assert ranks[0]["responses"] == one["responses"]  # in order, greedy answers word for word
    # a logged record: means, summed counts, maximum time; what one rank could not measure is left out
    want = {"step": 3, "acc": 0.375, "acc_ctx": 1.0, "accepted": 20, "time": 2.0, "util": 0.3}
    assert ranks[0]["record"] == ranks[1]["record"] == want


def torchrun(args, cwd, nproc=2, script="grpo.py"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(ROOT, script)] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_grpo_under_torchrun_trains_checkpoints_and_resumes(tiny_model_dir, tmp_path):
    common = ["--model", tiny_model_dir, "--batch-problems", "2", "--group-size", "2", "--max-new-tokens", "6",
              "--save-every", "2", "--device", "cpu", "--lr", "1e-3"]
    proc = torchrun(common + ["--steps", "2", "--out", "dp"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("step 1/2 |") == 1  # rank 0 alone prints
    metrics = [json.loads(l) for l in open(tmp_path / "dp" / "metrics.jsonl")]
    assert [r["step"] for r in metrics] == [1, 2]  # one line per step, not one per rank
    assert os.path.exists(tmp_path / "dp" / "ckpt" / "policy" / "config.json")
    proc = torchrun(["--resume", "dp", "--steps", "3"], tmp_path)  # every rank loads the checkpoint
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(l)["step"] for l in open(tmp_path / "dp" / "metrics.jsonl")] == [1, 2, 3]


def test_torchrun_batch_must_divide_by_the_world_size(tiny_model_dir, tmp_path):
    proc = torchrun(["--model", tiny_model_dir, "--batch-problems", "3", "--steps", "1", "--device", "cpu"], tmp_path)
    assert proc.returncode != 0 and "must divide by the world size 2" in proc.stderr


def test_alternate_exp5_under_torchrun_trains_evaluates_and_resumes(tiny_model_dir, tmp_path):
    from test_alternate import TINY
    args = ["--exp", "5", "--model", tiny_model_dir, "--out", "a", "--ll-steps", "2"] + TINY
    args[args.index("--batch-problems") + 1] = "2"  # one problem per rank; SFT: one pair per rank
    proc = torchrun(args, tmp_path, script="alternate.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("before/after: accuracy") == 1  # rank 0 alone prints
    rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    assert [(r["step"], r["phase"]) for r in rows] == [(0, "eval"), (1, "ll"), (1, "ll"), (1, "hl"), (1, "eval")]
    assert rows[-1]["eval/n"] == 3  # the 3 evaluation problems split 2 + 1 over the ranks and gathered
    assert len(open(tmp_path / "a" / "eval_round1.jsonl").readlines()) == 3
    for folder in ("hl_sft", "ckpt/ll", "ckpt/hl"):
        assert os.path.exists(tmp_path / "a" / folder / "config.json"), folder
    proc = torchrun(["--resume", "a", "--rounds", "2"], tmp_path, script="alternate.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert next(l for l in proc.stdout.splitlines() if l.startswith("theta_0: ")).endswith("hl_sft")  # reused
    rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["phase"] == "ll"] == [1, 1, 2, 2]  # one line per LL step, not per rank


def test_sft_batch_must_divide_by_the_world_size(tiny_model_dir, tmp_path):
    proc = torchrun(["--model", tiny_model_dir, "--sft-batch", "3", "--device", "cpu"], tmp_path, script="alternate.py")
    assert proc.returncode != 0 and "--sft-batch 3: must divide by the world size 2" in proc.stderr
