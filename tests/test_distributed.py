"""Data parallelism, the gradient half (grpo.average_gradients): an update whose rows are split over 2 gloo
ranks on the CPU gives the parameters of one process doing that update on all rows."""
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import grpo
import hl_generator
from conftest import make_tiny_model

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


def _rank(rank, world, store, folder, tokenizer):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows, comps, rewards = rollouts(tokenizer)
    share = slice(rank * len(rows) // world, (rank + 1) * len(rows) // world)  # whole groups: 2 problems each
    torch.save(updates(tokenizer, rows[share], comps[share], rewards[share]), os.path.join(folder, f"{rank}.pt"))
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


def test_scripts_refuse_torchrun_until_their_batches_are_split(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="torchrun"):
        grpo.parse_config(grpo.Config, [])
