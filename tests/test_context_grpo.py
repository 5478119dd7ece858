"""Tests for context_grpo.py: lambda = 0 is plain GRPO, the utilisation reward, the priors, ICPO (and alternate.py's
context sources and ICPO runs)."""
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch

import alternate
import context_grpo as cg
import grpo
from hl_generator import as_example, context_source, nearest_neighbours
from conftest import make_tiny_model

ROOT = os.path.join(os.path.dirname(__file__), "..")
PROBLEMS = [{"problem": "What is 2 + 3?", "answer": "5", "subject": "Arithmetic", "unique_id": "a/0",
             "solution": "2 + 3 = 5, so $\\boxed{5}$."},
            {"problem": "What is 4 + 4?", "answer": "8", "subject": "Arithmetic", "unique_id": "a/1",
             "solution": "4 + 4 = 8, so $\\boxed{8}$."},
            {"problem": "What is 7 + 1?", "answer": "8", "subject": "Arithmetic", "unique_id": "a/2",
             "solution": "7 + 1 = 8, so $\\boxed{8}$."}]


def cfg(**kw):
    base = alternate.Config(batch_problems=2, group_size=3, max_new_tokens=8, lr=1e-3, beta=0.04, micro_batch=3,
                            bonus_steps=10)
    return replace(base, **kw)


def setup(tokenizer, seed=0):
    model = make_tiny_model(tokenizer, seed=seed)
    ref = grpo.frozen_copy(model)
    return model, ref, torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_lambda_zero_is_plain_grpo(tokenizer):
    c = cfg(lam=0.0)
    eos = [tokenizer.eos_token_id]
    contexts = [[as_example(PROBLEMS[2])] * 3, [None, as_example(PROBLEMS[0]), None]]
    m1, r1, o1 = setup(tokenizer)
    rec_ctx, roll_ctx = cg.ll_step(m1, r1, None, o1, tokenizer, PROBLEMS[:2], contexts, c, 0, eos)  # no prior: never run
    m2, r2, o2 = setup(tokenizer)
    rec_plain, roll_plain = grpo.grpo_step(m2, r2, o2, tokenizer, PROBLEMS[:2], c, 0, eos, contexts)
    assert torch.equal(roll_ctx.r_task, roll_plain.r_task)
    for key in ("reward", "loss", "kl", "grad_norm"):
        assert rec_ctx[key] == rec_plain[key], key
    assert torch.equal(m1.model.embed_tokens.weight, m2.model.embed_tokens.weight)
    # and a lambda > 0 does change the rewards
    m3, r3, o3 = setup(tokenizer)
    rec_shaped, roll_shaped = cg.ll_step(m3, r3, r3, o3, tokenizer, PROBLEMS[:2], contexts, cfg(lam=1.0), 0, eos)
    assert torch.equal(roll_shaped.r_task, roll_plain.r_task) and rec_shaped["reward"] != rec_plain["reward"]


def test_lambda_zero_logs_the_utilisation_it_does_not_reward(tokenizer):
    eos = [tokenizer.eos_token_id]
    contexts = [[as_example(PROBLEMS[2])] * 3, [None, as_example(PROBLEMS[0]), None]]
    m1, r1, o1 = setup(tokenizer)
    rec, roll = cg.ll_step(m1, r1, r1, o1, tokenizer, PROBLEMS[:2], contexts, cfg(lam=0.0), 0, eos)  # q = phi_0
    m2, r2, o2 = setup(tokenizer)
    rec_plain, _ = grpo.grpo_step(m2, r2, o2, tokenizer, PROBLEMS[:2], cfg(lam=0.0), 0, eos, contexts)
    assert rec["reward"] == rec_plain["reward"]  # not rewarded ...
    assert "util" in rec and rec["util"] == rec["util"]          # ... but measured (a number, not NaN)
    assert rec["ctx_right_op"] != rec["ctx_right_op"] and rec["ctx_good"] != rec["ctx_good"]  # no ops problem: NaN


def test_ll_step_logs_the_context_quality_of_its_contexts(tokenizer):
    x = [{"problem": "Compute $3 \\star 5$.", "answer": "8"}, {"problem": "Compute $2 \\bullet 7$.", "answer": "-5"}]
    right, wrong = ("Compute $1 \\star 2$.", "$\\boxed{3}$"), ("Compute $2 \\diamond 7$.", "$\\boxed{14}$")
    bad = ("Compute $1 \\star 2$.", "$\\boxed{2}$")  # x's operator, a wrong solution
    m, r, o = setup(tokenizer)
    rec, _ = cg.ll_step(m, r, None, o, tokenizer, x, [[right, bad, wrong], [wrong, None, wrong]], cfg(lam=0.0), 0,
                        [tokenizer.eos_token_id])
    assert rec["ctx_right_op"] == pytest.approx(2 / 6) and rec["ctx_good"] == pytest.approx(1 / 6)


def test_utilization_matches_hand_computation(tiny_model, tokenizer):
    x, ctx = PROBLEMS[0], as_example(PROBLEMS[1])
    with_c = grpo.encode(tokenizer, grpo.format_prompt(tokenizer, x["problem"], ctx))
    without = grpo.encode(tokenizer, grpo.format_prompt(tokenizer, x["problem"]))
    comps = [[11, 12, 13, 14], [15, 16]]
    prior = make_tiny_model(tokenizer, seed=3)
    with torch.no_grad():
        lp_c, mask = grpo.sequence_logprobs(tiny_model, [with_c] * 2, comps)
        lp_q, _ = grpo.sequence_logprobs(prior, [without] * 2, comps)
    for reduce in ("mean", "sum"):
        for tau in (0.05, 100.0):
            u = cg.utilization_reward(lp_c, lp_q, mask, tau, reduce)
            for i, c in enumerate(comps):  # by hand: the plain per-token log-ratios of row i
                d = [lp_c[i, t].item() - lp_q[i, t].item() for t in range(len(c))]
                value = sum(d) / len(d) if reduce == "mean" else sum(d)
                assert u[i].item() == pytest.approx(max(-tau, min(tau, value)), abs=1e-5)
    assert not cg.utilization_reward(lp_c.requires_grad_(), lp_q, mask, 1.0).requires_grad  # a reward


def test_utilization_is_zero_with_empty_context_and_prior_self(tiny_model, tokenizer):
    # U = log p_phi(y | x, c) - log q(y | x) with c empty and q = p_phi: the sampler's own log-probs against
    # one forward pass of the same model on the same prompt
    prompts = [grpo.encode(tokenizer, grpo.format_prompt(tokenizer, p["problem"])) for p in PROBLEMS[:2] for _ in range(3)]
    comps, logps = grpo.generate(tiny_model, prompts, 8, 1.0, seed=0)
    lp_ctx, mask = grpo.pad_completions(logps, value=0.0)
    with torch.no_grad():
        lp_q, _ = grpo.sequence_logprobs(tiny_model, prompts, comps)
    assert cg.utilization_reward(lp_ctx, lp_q, mask, tau=10.0).abs().max().item() < 1e-4


def test_rollouts_without_context_get_no_utilisation(tokenizer):
    model = make_tiny_model(tokenizer)
    prior = make_tiny_model(tokenizer, seed=9)  # a different prior: the log-ratio is far from 0
    contexts = [[as_example(PROBLEMS[2]), None, as_example(PROBLEMS[1])], [None, None, None]]
    prompts = [grpo.encode(tokenizer, grpo.format_prompt(tokenizer, p["problem"], c))
               for p, cs in zip(PROBLEMS[:2], contexts) for c in cs]
    comps, logps = grpo.generate(model, prompts, 8, 1.0, seed=0)
    bonus, stats = cg.utilisation(prior, tokenizer, PROBLEMS[:2], contexts, comps, logps, cfg(lam=1.0, tau=100.0))
    assert bonus[[0, 2]].abs().min() > 1e-3 and torch.all(bonus[[1, 3, 4, 5]] == 0)
    ctx_half = sum(sum(logps[i]) / len(logps[i]) for i in (0, 2)) / 2  # the logged halves: log p with c ...
    assert abs(stats["util_logp_ctx"] - ctx_half) < 1e-5                        # ... and log q: U~ = their difference
    assert abs(stats["util_logp_ctx"] - stats["util_logp_q"] - stats["util"]) < 1e-5
    bonus, stats = cg.utilisation(prior, tokenizer, PROBLEMS[:2], [[None] * 3] * 2, comps, logps, cfg(lam=1.0))
    assert torch.all(bonus == 0) and stats == {}  # experiment 1: exactly plain GRPO


def test_init_prior_is_the_reference_and_stays_frozen(tokenizer):
    model, _, opt = setup(tokenizer)
    ref, prior = cg.make_prior(model, cfg(prior="init"))
    assert prior is ref, "q = init must be the very module p_ref is (one frozen copy, not two)"
    assert cg.make_prior(model, cfg(prior="init", beta=0.0))[0] is None  # no KL: no reference, q stays phi_0
    before = [p.clone() for p in prior.parameters()]
    eos = [tokenizer.eos_token_id]
    src = context_source("random", PROBLEMS, PROBLEMS, 0)
    for t in range(2):
        cg.ll_step(model, ref, prior, opt, tokenizer, PROBLEMS[:2], src(PROBLEMS[:2], 3, t, "ctx"), cfg(lam=1.0), t, eos)
    assert all(torch.equal(a, b) for a, b in zip(before, prior.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the LL did move
    assert cg.make_prior(model, cfg(prior="self"))[1] is model


def test_nearest_neighbours_same_subject_never_itself():
    pool = PROBLEMS + [{"problem": "What is 2 + 3 + 1?", "answer": "6", "subject": "Other", "unique_id": "o/0"}]
    nn = nearest_neighbours(pool, pool, k=2)
    for i, row in enumerate(nn):
        for j in row:
            assert j != i
            if j >= 0:
                assert pool[j]["subject"] == pool[i]["subject"]
    assert list(nn[3]) == [-1, -1]  # alone in its subject: no neighbour, never a cross-subject one
    geo = [{"problem": t, "answer": "1", "subject": "Geometry", "unique_id": f"g/{k}"} for k, t in enumerate([
        "Find the area of a triangle with base 4 and height 6.",
        "How many integers between 1 and 100 are prime?",
        "A triangle has base 10 and height 3. What is its area?",
        "Find the area of a triangle with base 4 and height 6."])]  # a duplicate text, another unique_id
    nn = nearest_neighbours(geo, geo, k=1)[:, 0]
    assert nn[0] == 2 and nn[2] in (0, 3) and nn[3] == 2  # never its own text, even under another id
    excluded = nearest_neighbours(PROBLEMS[:1], PROBLEMS, k=2, exclude=lambda p: p["unique_id"] == "a/1")
    assert list(excluded[0]) == [2, -1]


# -----------------------------------------------------------------------------
# ICPO


def test_ief_training_logprobs_are_taken_without_the_demonstration(tokenizer):
    model, ref, opt = setup(tokenizer)
    seen = {}
    real = grpo.sequence_logprobs

    def spy(net, prompt_ids, completion_ids, temperature=1.0, chunk_tokens=1024):
        seen.setdefault("prompts", []).extend(map(tuple, prompt_ids))
        return real(net, prompt_ids, completion_ids, temperature, chunk_tokens)

    grpo.sequence_logprobs = spy
    try:
        demos = [[as_example(PROBLEMS[2])], [as_example(PROBLEMS[0])]]
        cg.icpo_step(model, ref, opt, tokenizer, PROBLEMS[:2], demos, cfg(icpo=True, delta=0.0), 0, [2])
    finally:
        grpo.sequence_logprobs = real
    plain = {tuple(grpo.encode(tokenizer, grpo.format_prompt(tokenizer, p["problem"]))) for p in PROBLEMS[:2]}
    assert seen["prompts"] and set(seen["prompts"]) <= plain  # current, old and reference: all without D


def test_errs_keeps_correct_ief_rollouts_and_the_group_size():
    # 2 groups of 4; IEF rollouts 0, 1 of problem 0 and 2, 3 of problem 1; 0, 2, 3 correct
    replace, rejected = cg.errs_merge([0, 0, 1, 1], [True, False, True, True], 2, 4)
    assert replace == {3: 0, 7: 2, 6: 3} and rejected == 1


def test_errs_replaces_only_rows_of_its_own_problem_and_keeps_one_on_policy_row():
    # 3 correct IEF rollouts of problem 0 and none of problem 1, G = 2: problem 1's rows stay on-policy
    replace, rejected = cg.errs_merge([0, 0, 0], [True, True, True], 2, 2)
    assert replace == {1: 0} and rejected == 2
    for row, j in cg.errs_merge([1, 0, 1, 1], [True] * 4, 2, 4)[0].items():
        assert row // 4 == [1, 0, 1, 1][j]  # an IEF rollout only ever replaces a row of its own problem


def test_expert_bonus_anneals_as_design_says():
    assert cg.expert_bonus(0.5, 0, 10) == 0.5
    assert cg.expert_bonus(0.5, 9, 10) == pytest.approx(0.05), "beta * (1 - t/T): beta/T at the last step t = T-1"
    assert cg.expert_bonus(0.5, 5, 10) == pytest.approx(0.25)
    assert cg.expert_bonus(0.5, 12, 10) == 0.0, "past T (a resume that adds steps) the bonus must not turn negative"


def test_bonus_schedule_is_fixed_at_the_start_of_the_run(tmp_path):
    """T of the bonus is the run's LL steps at its start (rounds x LL steps): a resume with more rounds keeps it."""
    first = grpo.parse_config(alternate.Config, ["--icpo", "--rounds", "5", "--ll-steps", "2", "--out", str(tmp_path)])
    assert first.bonus_steps == 10
    grpo.write_json(str(tmp_path / "config.json"), {"script": "alternate.py", **asdict(first)})
    resumed = grpo.parse_config(alternate.Config, ["--resume", str(tmp_path), "--rounds", "10"])
    assert resumed.rounds == 10 and resumed.bonus_steps == 10, "a resume changed the annealing mid-run"
    later = grpo.parse_config(alternate.Config, ["--icpo", "--rounds", "5", "--ll-steps", "2", "--hl-first", "2"])
    assert later.bonus_steps == 6, "T counts the LL steps the run will take: --hl-first rounds take none"
    assert grpo.parse_config(alternate.Config, ["--rounds", "2", "--hl-first", "3"]).bonus_steps == 0  # none at all


def test_prior_base_is_refused_when_it_would_load_phi0(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="--prior base"):
        grpo.parse_config(alternate.Config, ["--prior", "base"])    # q = --model = phi_0: --prior init again
    with pytest.raises(SystemExit, match="--prior base"):
        grpo.parse_config(alternate.Config, ["--prior", "base", "--model", tiny_model_dir, "--base-model",
                                             tiny_model_dir + "/"])  # the same folder by another name
    assert grpo.parse_config(alternate.Config, ["--prior", "base", "--ll-init", tiny_model_dir]).prior == "base"


def test_icpo_without_demonstrations_has_no_ief_rows(tokenizer, monkeypatch):
    model, ref, opt = setup(tokenizer)
    rows = {}
    real = grpo.generate

    def spy(net, prompt_ids, *a, **k):
        rows["n"] = len(prompt_ids)
        return real(net, prompt_ids, *a, **k)

    monkeypatch.setattr(grpo, "generate", spy)
    record, _ = cg.icpo_step(model, ref, opt, tokenizer, PROBLEMS[:2], [[None], [as_example(PROBLEMS[2])]],
                             cfg(icpo=True, delta=0.0), 0, [2])
    assert rows["n"] == 2 * 3 + 1          # no IEF rollout for the problem whose demonstration is missing
    assert record["demo_missing"] == 1 and record["accepted"] + record["rejected"] == 1


def test_icpo_pg_loss_is_the_policy_term():
    torch.manual_seed(0)
    logp, mask, A = -torch.rand(2, 3), torch.ones(2, 3), torch.tensor([0.7, -1.3])
    ref = logp - 0.5
    loss, stats = cg.icpo_loss(logp, logp, ref, A, mask, torch.tensor([True, False]), 0.2, beta=0.1, gamma=0.1)
    _, no_kl = cg.icpo_loss(logp, logp, ref, A, mask, torch.tensor([True, False]), 0.2, beta=0.0, gamma=0.1)
    assert stats["pg_loss"] == pytest.approx(no_kl["pg_loss"]) and stats["pg_loss"] != pytest.approx(loss.item())


def test_icpo_shaping_gradient():
    torch.manual_seed(0)
    logp = (-torch.rand(2, 3) * 2).requires_grad_()
    mask = torch.ones(2, 3)
    A = torch.tensor([0.7, -1.3])
    is_off = torch.tensor([True, True])
    loss, _ = cg.icpo_loss(logp, logp.detach(), None, A, mask, is_off, 0.2, 0.0, gamma=0.1)
    loss.backward()
    p = logp.detach().exp()
    # d/dlogp of -A * p/(p+gamma) = -A * gamma * p / (p+gamma)^2, then the per-sequence mean and the row mean
    expected = -A[:, None] * 0.1 * p / (p + 0.1) ** 2 / 3 / 2
    assert torch.allclose(logp.grad, expected, atol=1e-7)
    # on-policy rows get exactly grpo_loss
    on = torch.tensor([False, False])
    a, _ = cg.icpo_loss(logp, logp.detach() - 0.1, None, A, mask, on, 0.2, 0.0, 0.1)
    b, _ = grpo.grpo_loss(logp, logp.detach() - 0.1, None, A, mask, 0.2, 0.0)
    assert torch.equal(a, b)


# -----------------------------------------------------------------------------
# alternate.py without an HL: retrieved and random contexts, ICPO


@pytest.mark.parametrize("mode", [["--hl", "retrieved", "--lam", "0.1"], ["--hl", "random", "--prior", "self"],
                                  ["--exp", "1", "--icpo"]], ids=["retrieved", "random-self", "icpo"])
def test_two_ll_steps_without_an_hl(mode, tiny_model_dir, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "alternate.py"), "--model", tiny_model_dir, "--rounds", "1",
           "--ll-steps", "2", "--batch-problems", "2", "--group-size", "2", "--max-new-tokens", "6", "--limit", "20",
           "--eval-limit", "2", "--out", "run", "--device", "cpu"] + mode
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl") if '"ll"' in l]
    assert [r["step"] for r in records] == [1, 1]
    key = "ll/accepted" if "--icpo" in mode else "ll/util"
    assert all(key in r for r in records)
    assert "--icpo" in mode or all(r["ll/ctx_frac"] > 0 for r in records)  # every rollout had a context
    assert os.path.exists(tmp_path / "run" / "ckpt" / "ll" / "config.json") and not os.path.exists(tmp_path / "run" / "hl_sft")


def test_resume_keeps_q_the_initial_ll(tiny_model_dir, tmp_path):
    """--beta 0 --prior init: q is phi_0 in a resumed run too (it was phi_t), so the run continues exactly."""
    common = ["--model", tiny_model_dir, "--batch-problems", "2", "--group-size", "2", "--max-new-tokens", "6",
              "--limit", "20", "--device", "cpu", "--lr", "1e-2", "--beta", "0", "--lam", "1", "--hl", "random",
              "--ll-steps", "1", "--eval-limit", "2"]

    def run(args):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "alternate.py")] + args, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    run(common + ["--rounds", "3", "--out", "straight"])
    run(common + ["--rounds", "2", "--out", "split"])
    run(["--resume", "split", "--rounds", "3"])
    straight, split = ([json.loads(l) for l in open(tmp_path / d / "metrics.jsonl")] for d in ("straight", "split"))
    assert [(r["phase"], r["step"]) for r in split] == [(r["phase"], r["step"]) for r in straight]
    for a, b in zip(straight, split):
        for key in [k for k in a if k.endswith(("reward", "util", "/len", "loss", "grad_norm", "/acc"))]:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
