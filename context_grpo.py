"""
context_grpo.py: the LL of HICRL (README "The method", 2 and 3): each rollout i has its own context
c_i, y_i ~ p_phi(. | x, c_i), its reward r_i = R_task(x, y_i) + lambda U~_i with
U~_i = clip(log p_phi(y_i | x, c_i) - log q(y_i | x), -tau', tau'), then GRPO on r_i with the
log-probs and the KL to p_ref taken WITH the context. ICPO (README "The method", 6) is a mode.
"""

import os
import time
from dataclasses import replace

import torch

import grpo
from grpo import encode, format_context, format_prompt, pad_completions, sequence_logprobs
from math_reward import carries_answer, context_quality_rates

# --- 1. the utilisation reward --------------------------------------------------------------------


def utilization_reward(logp_ctx, logp_prior, mask, tau, reduce="mean"):
    """U~_i = clip(reduce_t [log p_phi(y_t | x, c, y_<t) - log q(y_t | x, y_<t)], -tau', tau'), no
    gradient; reduce: the per-token mean (a KL rate) or the sum. (N, T) -> (N,)."""
    with torch.no_grad():
        d = (logp_ctx - logp_prior) * mask
        if reduce == "sum":
            u = d.sum(1)
        else:
            u = d.sum(1) / mask.sum(1).clamp(min=1)
        return u.clamp(-tau, tau)


def utilisation(prior, tokenizer, batch, contexts, completions, sampler_logp, cfg):
    """U~_i of every rollout (B*G,): log p_phi is the sampler's own, log q one forward pass of the
    prior on x WITHOUT c; a rollout without a context gets 0. Returns (U~, stats)."""
    has = torch.tensor([c is not None for cs in contexts for c in cs])
    if not has.any():
        return torch.zeros(len(has)), {}
    rows = has.nonzero().squeeze(1).tolist()
    # x without c
    plain = [encode(tokenizer, format_prompt(tokenizer, p["problem"])) for p in batch]
    lp_ctx, mask = pad_completions([sampler_logp[i] for i in rows], value=0.0)
    with torch.no_grad():
        prompts = [plain[i // cfg.group_size] for i in rows]
        answers = [completions[i] for i in rows]
        lp_q = sequence_logprobs(prior, prompts, answers, cfg.temperature)[0].cpu()
    u = utilization_reward(lp_ctx, lp_q, mask, cfg.tau, cfg.util_reduce)
    stats = {
        "util": u.mean().item(),
        "util_clip": (u.abs() >= cfg.tau).float().mean().item(),
        "util_logp_ctx": grpo.masked_mean(lp_ctx, mask).item(),  # its two halves, per-token means:
        "util_logp_q": grpo.masked_mean(lp_q, mask).item(),  # the context's, or drift from q
    }
    return torch.zeros(len(has)).index_copy(0, torch.tensor(rows), u), stats


# --- 2. the LL step -------------------------------------------------------------------------------


def ll_step(model, ref_model, prior, optimizer, tokenizer, batch, contexts, cfg, step, eos):
    """One LL update: rollouts with contexts, r = R_task + lambda U~, GRPO with the context (at
    lambda = 0 it is grpo.grpo_step on the same rollouts). Returns (record, rollouts)."""
    t0 = time.time()
    seed = grpo.stream_seed(cfg.seed, "ll", step)
    roll = grpo.rollouts(model, tokenizer, batch, contexts, cfg, eos, seed)
    u = torch.zeros(len(roll.r_task))
    util_stats = {}
    if prior is not None:
        u, util_stats = utilisation(
            prior, tokenizer, batch, contexts, roll.completions, roll.sampler_logp, cfg
        )
    rewards = roll.r_task + cfg.lam * u  # r_i = R_task + lambda * U~_i
    adv = grpo.group_advantages(rewards, cfg.group_size, cfg.scale_by_std)
    stats = grpo.ll_update(model, ref_model, optimizer, roll, adv, cfg)
    record = grpo.step_record(roll, rewards, stats, cfg.group_size, eos, t0)
    record.update(util_stats)
    record.update(context_stats(tokenizer, batch, contexts, roll.r_task))
    return record, roll


def context_stats(tokenizer, batch, contexts, r_task):
    """The contexts: how many, how long, R_task with one, the share that carried x's answer, and
    on the ops tasks the share with x's operator."""
    given = [c for cs in contexts for c in cs if c is not None]
    has = torch.tensor([c is not None for cs in contexts for c in cs])
    leaks = [carries_answer(c, p["answer"]) for p, cs in zip(batch, contexts) for c in cs if c]
    lengths = [len(encode(tokenizer, format_context(c), target=True)) for c in given]
    nan = float("nan")
    return {
        "acc_ctx": r_task[has].mean().item() if has.any() else nan,
        "ctx_len": sum(lengths) / len(given) if given else 0.0,
        "ctx_frac": len(given) / len(has),
        "n_ctx": len(given),
        "ctx_has_answer": sum(leaks) / len(leaks) if leaks else nan,
        **context_quality_rates(batch, contexts),
    }


def ll_round_step(model, ref_model, prior, optimizer, tokenizer, batch, contexts, cfg, step, eos):
    """The LL update of a round: ICPO, the contexts its demonstrations (--icpo), or ll_step."""
    if cfg.icpo:
        return icpo_step(model, ref_model, optimizer, tokenizer, batch, contexts, cfg, step, eos)
    return ll_step(model, ref_model, prior, optimizer, tokenizer, batch, contexts, cfg, step, eos)


SHOWN = (
    "reward acc boxed util util_clip accepted demo_missing parse_rate ctx_self ctx_has_answer "
    "ctx_right_op ctx_good len finished zero_var kl clip_frac loss grad_norm time"
).split()


def print_record(prefix, record, total):
    """One line per step: the SHOWN numbers it has (a NaN rate, nothing to count, left out)."""
    shown = [f"{k} {record[k]:.4g}" for k in SHOWN if k in record and record[k] == record[k]]
    print(f"{prefix} {record['step']}/{total} | " + " ".join(shown))


def budget_warnings(cfg, tok, problems, eval_problems):
    """What makes a run learn nothing, said before it starts: a median reference solution longer
    than an answer budget (answers cut before their box: R_task ~0). One line per flag."""
    eval_flag = "--eval-max-new-tokens" if cfg.eval_max_new_tokens else "--max-new-tokens"
    checks = [(problems, "--max-new-tokens", cfg.max_new_tokens)]
    checks.append((eval_problems, eval_flag, cfg.eval_max_new_tokens or cfg.max_new_tokens))
    warnings = {}
    for rows, flag, budget in checks:
        solutions = [p["solution"] for p in rows[:200] if p.get("solution")]
        lengths = sorted(len(grpo.encode(tok, s, target=True)) for s in solutions)
        median = lengths[len(lengths) // 2] if lengths else 0
        if median > budget and flag not in warnings:
            warnings[flag] = (
                f"WARNING: the median reference solution is {median} tokens, over {flag} {budget}: "
                f"answers are cut before their \\boxed{{}}; pass a larger {flag} (MATH: 512)"
            )
            print(warnings[flag])
    return list(warnings.values())


def check_flags(cfg):
    """The LL's flags that contradict each other: one message before anything loads."""
    if cfg.icpo and cfg.n_off > cfg.group_size - 1:
        raise SystemExit(
            "--n-off: at most --group-size - 1 (an IEF rollout replaces an on-policy one)"
        )
    same = model_path(cfg.base_model or cfg.model) == model_path(cfg.ll_init or cfg.model)
    if cfg.prior == "base" and not cfg.icpo and same:
        raise SystemExit(
            "--prior base: the base model is phi_0, q would be init's: pass --base-model"
        )


def model_path(name):
    return "smollm2" if name in ("", "smollm2") else os.path.realpath(grpo.resolve_model(name))


def make_prior(model, cfg):
    """(p_ref, q): p_ref = phi_0 frozen (None at --beta 0); q = init: that same frozen phi_0 (copied
    before a resume loads phi_t), base: the pretrained --base-model, self: the LL (no gradient)."""
    phi0 = grpo.frozen_copy(model) if cfg.beta > 0 or cfg.prior == "init" else None
    if cfg.prior == "base":
        flag = "--base-model" if cfg.base_model else "--model"
        name = cfg.base_model or cfg.model
        q, _ = grpo.load_model(
            name, model.device, trainable=True, flag=flag, precision=cfg.precision
        )
        q.eval().requires_grad_(False)
    elif cfg.prior == "init":
        q = phi0
    else:
        q = model
    return phi0 if cfg.beta > 0 else None, q


# --- 3. ICPO --------------------------------------------------------------------------------------


def expert_bonus(beta, step, total_steps):
    """Annealed expert bonus beta (1 - t/T) at step t = 0..T-1, 0 from t = T on (a resume adds
    steps)."""
    return beta * max(0.0, 1.0 - step / max(total_steps, 1))


def errs_merge(off_problem, off_correct, n_problems, group_size):
    """Expert-region reject sampling: a correct IEF rollout j (of problem off_problem[j]) replaces
    the last unreplaced on-policy row of its own group, at most G-1 of them; a wrong one is
    dropped. Returns ({row: j}, rejected)."""
    replace_rows, used = {}, [0] * n_problems
    for j, (b, ok) in enumerate(zip(off_problem, off_correct)):
        if ok and used[b] < group_size - 1:
            replace_rows[(b + 1) * group_size - 1 - used[b]] = j
            used[b] += 1
    return replace_rows, len(off_problem) - len(replace_rows)


def icpo_loss(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    is_off,
    clip_eps,
    beta,
    gamma,
    norm="seq",
    max_len=None,
):
    """ICPO's mixed loss: the clipped surrogate on on-policy rows, -A f(p) with f(p) = p / (p +
    gamma) on IEF rows (unclipped), + beta k3 KL, normalised by masked_mean. is_off: (N,) bool."""
    clipped, ratio = grpo.clipped_surrogate(logp, old_logp, advantages, clip_eps)
    p = logp.exp()
    shaped = -advantages[:, None] * p / (p + gamma)
    policy = torch.where(is_off[:, None], shaped, clipped)
    kl = torch.zeros_like(logp) if ref_logp is None else grpo.k3_kl(logp, ref_logp)
    per_token = policy + beta * kl
    loss = grpo.masked_mean(per_token, mask, norm, max_len)
    on_policy = (~is_off)[:, None] * mask  # the clip applies to on-policy rows only
    return loss, grpo.loss_stats(policy, kl, ratio, mask, clip_eps, norm, max_len, on_policy)


def icpo_loss_fn(is_off, cfg):
    """policy_update's loss for ICPO's merged group: icpo_loss, told which rows are IEF rows."""

    def loss_fn(rows, **tensors):
        off = is_off[rows].to(tensors["logp"].device)
        return icpo_loss(
            **tensors,
            is_off=off,
            clip_eps=cfg.clip_eps,
            beta=cfg.beta,
            gamma=cfg.gamma,
            norm=cfg.loss_norm,
            max_len=cfg.max_new_tokens,
        )

    return loss_fn


def icpo_step(model, ref_model, optimizer, tokenizer, batch, demos, cfg, step, eos):
    """One ICPO step: G on-policy rollouts y ~ p(. | x) and an IEF rollout y ~ p(. | [D; x]) per
    demonstration D (demos: per problem, None = none), ERRS, the annealed bonus, (r - mean) / std
    over the mixed group, icpo_loss with every row's log-probs taken WITHOUT D."""
    t0 = time.time()
    G = cfg.group_size
    n_on = len(batch) * G
    off_problem = [b for b, ds in enumerate(demos) for d in ds if d is not None]
    # the B*G on-policy rows, then the IEF rows
    problems = batch + [batch[b] for b in off_problem]
    contexts = [[None] * G for _ in batch] + [[d] for ds in demos for d in ds if d is not None]
    seed = grpo.stream_seed(cfg.seed, "ll", step)
    sampled = grpo.rollouts(model, tokenizer, problems, contexts, cfg, eos, seed)
    # 1. ERRS: a correct IEF rollout replaces an on-policy one of its own group
    correct = [a >= cfg.delta for a in sampled.r_task[n_on:].tolist()]
    replaced, rejected = errs_merge(off_problem, correct, len(batch), G)
    src = [n_on + replaced[i] if i in replaced else i for i in range(n_on)]  # row -> sampled row
    is_off = torch.tensor([i >= n_on for i in src])
    # 2. the annealed bonus on the accepted IEF rows, 3. (r - mean) / std over the mixed group
    bonus = expert_bonus(cfg.icpo_bonus, step, cfg.bonus_steps)
    rewards = sampled.r_task[src] + bonus * is_off.float()
    adv = grpo.group_advantages(rewards, G, scale_by_std=True)
    # every row trains on x WITHOUT D: an accepted IEF row takes its group's on-policy prompt
    roll = replace(
        sampled,
        prompt_ids=sampled.prompt_ids[:n_on],
        completions=[sampled.completions[i] for i in src],
        sampler_logp=[sampled.sampler_logp[i] for i in src],
        r_task=sampled.r_task[src],
        boxed=sampled.boxed[src],
    )
    # 4. icpo_loss on the merged group
    stats = grpo.ll_update(model, ref_model, optimizer, roll, adv, cfg, icpo_loss_fn(is_off, cfg))
    record = grpo.step_record(roll, rewards, stats, G, eos, t0)
    record.update(
        acc_on=sampled.r_task[:n_on].mean().item(),
        acc_ief=sampled.r_task[n_on:].mean().item() if off_problem else float("nan"),
        accepted=len(replaced),
        rejected=rejected,
        bonus=bonus,
        n_ief=len(off_problem),
        demo_missing=sum(map(len, demos)) - len(off_problem),
        **context_quality_rates(batch, demos),
    )
    return record, roll
