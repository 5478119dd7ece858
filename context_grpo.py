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
from grpo import (
    encode,
    fit_contexts,
    format_context,
    format_prompt,
    pad_completions,
    sequence_logprobs,
)
from math_reward import carries_answer, right_operator_rate

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
        "util_std": u.std(unbiased=False).item(),
        "util_clip": (u.abs() >= cfg.tau).float().mean().item(),
        "util_logp_ctx": grpo.masked_mean(lp_ctx, mask).item(),  # its two halves, per-token means:
        "util_logp_q": grpo.masked_mean(lp_q, mask).item(),  # the context's, or drift from q
    }
    return torch.zeros(len(has)).index_copy(0, torch.tensor(rows), u), stats


# --- 2. the LL step -------------------------------------------------------------------------------


def ll_step(model, ref_model, prior, optimizer, tokenizer, batch, contexts, cfg, step, eos):
    """One LL update: rollouts with contexts, r = R_task + lambda U~, GRPO with the context. At
    lambda = 0 it is grpo.grpo_step on the same rollouts. Returns (record, rollouts)."""
    contexts, dropped = fit_contexts(tokenizer, batch, contexts, cfg.max_prompt_tokens)
    roll = grpo.rollouts(model, tokenizer, batch, contexts, cfg, step, eos)
    u = torch.zeros(len(roll.rewards))
    util_stats = {}
    if prior is not None:
        u, util_stats = utilisation(
            prior, tokenizer, batch, contexts, roll.completions, roll.sampler_logp, cfg
        )
    rewards = roll.rewards + cfg.lam * u  # r_i = R_task + lambda * U~_i
    adv = grpo.group_advantages(rewards, cfg.group_size, cfg.scale_by_std)
    record = grpo.update_and_record(model, ref_model, optimizer, roll, rewards, adv, cfg, step, eos)
    record.update(util_stats)
    record.update(context_stats(tokenizer, batch, contexts, roll.acc), ctx_dropped=dropped)
    record["reward_task"] = roll.rewards.mean().item()
    return record, replace(roll, rewards=rewards)


def context_stats(tokenizer, batch, contexts, acc):
    """What the contexts were: how many, how long, the accuracy with one, how many carried x's
    answer, and on the ops tasks how many had x's operator."""
    given = [c for cs in contexts for c in cs if c is not None]
    has = torch.tensor([c is not None for cs in contexts for c in cs])
    leaks = [carries_answer(c, p["answer"]) for p, cs in zip(batch, contexts) for c in cs if c]
    lengths = [len(encode(tokenizer, format_context(c), target=True)) for c in given]
    nan = float("nan")
    return {
        "acc_ctx": acc[has].mean().item() if has.any() else nan,
        "ctx_len": sum(lengths) / len(given) if given else 0.0,
        "ctx_frac": len(given) / len(has),
        "n_ctx": len(given),
        "ctx_has_answer": sum(leaks) / len(leaks) if leaks else nan,
        "ctx_right_op": right_operator_rate(batch, contexts),
    }


def ll_round_step(model, ref_model, prior, optimizer, tokenizer, batch, contexts, cfg, step, eos):
    """The LL update of a round: ICPO with the contexts as its demonstrations (--icpo), else
    ll_step."""
    if cfg.icpo:
        return icpo_step(model, ref_model, optimizer, tokenizer, batch, contexts, cfg, step, eos)
    return ll_step(model, ref_model, prior, optimizer, tokenizer, batch, contexts, cfg, step, eos)


def print_record(prefix, r, total):
    """One line per step; a rate that is NaN (nothing to count) is left out."""
    rates = (
        "util",
        "util_clip",
        "accepted",
        "demo_missing",
        "parse_rate",
        "ctx_self",
        "ctx_has_answer",
    )
    extra = "".join(f" {k} {r[k]:.3f}" for k in (*rates, "ctx_right_op") if k in r and r[k] == r[k])
    print(
        f"{prefix} {r['step']}/{total} | reward {r['reward']:.3f} acc {r['acc']:.3f} "
        f"boxed {r['boxed']:.2f}"
        f"{extra} | len {r['len']:.0f} fin {r['finished']:.2f} | zero-var {r['zero_var']:.2f} | "
        f"kl {r['kl']:.4f} clip {r['clip_frac']:.3f} | "
        f"loss {r['loss']:+.4f} gnorm {r['grad_norm']:.2f} | "
        f"{r['time']:.1f}s"
    )


def check_flags(cfg):
    """The LL's flags that contradict each other: one message before anything loads."""

    def path(name):
        return "smollm2" if name in ("", "smollm2") else os.path.realpath(grpo.resolve_model(name))

    if cfg.icpo and cfg.n_off > cfg.group_size - 1:
        raise SystemExit(
            "--n-off: at most --group-size - 1 (an accepted IEF rollout replaces an on-policy one)"
        )
    same = path(cfg.base_model or cfg.model) == path(cfg.ll_init or cfg.model)
    if cfg.prior == "base" and not cfg.icpo and same:
        raise SystemExit(
            "--prior base: the base model is phi_0, q would be --prior init's: pass --base-model"
        )


def make_prior(model, cfg):
    """(p_ref, q): p_ref = phi_0 frozen (None at --beta 0); q = init: that same frozen phi_0 (one
    copy, made before a resume loads phi_t), base: the pretrained --base-model, self: the LL (no
    gradient)."""
    phi0 = grpo.frozen_copy(model) if cfg.beta > 0 or cfg.prior == "init" else None
    if cfg.prior == "base":
        flag = "--base-model" if cfg.base_model else "--model"
        q, _ = grpo.load_model(
            cfg.base_model or cfg.model,
            model.device,
            trainable=True,
            precision=cfg.precision,
            flag=flag,
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


def icpo_rollouts(model, tokenizer, batch, demos, cfg, step, eos):
    """G on-policy rollouts y ~ p(. | x) per problem, then one IEF rollout y ~ p(. | [D; x]) per
    demonstration D, scored; every row's prompt for training is x WITHOUT D. Returns (rollouts:
    the B*G on-policy rows then the IEF rows, the problem of each IEF row)."""
    t0 = time.time()
    G = cfg.group_size
    plain = [encode(tokenizer, format_prompt(tokenizer, p["problem"])) for p in batch]
    off_problem = [b for b, ds in enumerate(demos) for d in ds if d is not None]
    off_demos = [d for ds in demos for d in ds if d is not None]
    guided = []
    for b, d in zip(off_problem, off_demos):
        guided.append(encode(tokenizer, format_prompt(tokenizer, batch[b]["problem"], d)))
    on_prompts = [plain[b] for b in range(len(batch)) for _ in range(G)]
    seed = grpo.stream_seed(cfg.seed, "ll", step)
    completions, sampler_logp = grpo.generate(
        model, on_prompts + guided, cfg.max_new_tokens, cfg.temperature, eos, seed=seed
    )
    t_sample = time.time() - t0
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    golds = [p["answer"] for p in batch for _ in range(G)]
    golds += [batch[b]["answer"] for b in off_problem]
    rewards, acc, boxed, wrote = grpo.score(texts, golds, cfg.format_bonus)
    prompts = on_prompts + [plain[b] for b in off_problem]
    roll = grpo.Rollouts(
        prompts, completions, sampler_logp, texts, rewards, acc, boxed, wrote, t0, t_sample
    )
    return roll, off_problem


def icpo_step(model, ref_model, optimizer, tokenizer, batch, demos, cfg, step, eos):
    """One ICPO step: on-policy and IEF rollouts (icpo_rollouts; demos: per problem, None = none),
    ERRS, the annealed bonus, (r - mean) / std over the mixed group, icpo_loss."""
    G = cfg.group_size
    n_on = len(batch) * G
    demos = fit_contexts(tokenizer, batch, demos, cfg.max_prompt_tokens)[0]
    sampled, off_problem = icpo_rollouts(model, tokenizer, batch, demos, cfg, step, eos)
    # 1. ERRS: a correct IEF rollout replaces an on-policy one of its own group
    correct = [a >= cfg.delta for a in sampled.acc[n_on:].tolist()]
    replaced, rejected = errs_merge(off_problem, correct, len(batch), G)
    src = [n_on + replaced[i] if i in replaced else i for i in range(n_on)]  # row -> sampled row
    is_off = torch.tensor([i >= n_on for i in src])
    # 2. the annealed bonus on the accepted IEF rows, 3. (r - mean) / std over the mixed group
    bonus = expert_bonus(cfg.icpo_bonus, step, cfg.bonus_steps)
    rewards = sampled.rewards[src] + bonus * is_off.float()
    adv = grpo.group_advantages(rewards, G, scale_by_std=True)
    roll = replace(
        sampled,
        prompt_ids=[sampled.prompt_ids[i] for i in src],
        completions=[sampled.completions[i] for i in src],
        sampler_logp=[sampled.sampler_logp[i] for i in src],
        texts=[sampled.texts[i] for i in src],
        rewards=rewards,
        acc=sampled.acc[src],
        boxed=sampled.boxed[src],
        wrote_box=sampled.wrote_box[src],
    )

    loss_fn = icpo_loss_fn(is_off, cfg)  # 4. icpo_loss on the merged group
    record = grpo.update_and_record(
        model, ref_model, optimizer, roll, rewards, adv, cfg, step, eos, loss_fn
    )
    n_sampled = sum(map(len, sampled.completions))
    record.update(
        acc_on=sampled.acc[:n_on].mean().item(),
        acc_ief=sampled.acc[n_on:].mean().item() if off_problem else float("nan"),
        accepted=len(replaced),
        rejected=rejected,
        bonus=bonus,
        sample_tok_s=n_sampled / sampled.t_sample,
        n_ief=len(off_problem),
        demo_missing=sum(map(len, demos)) - len(off_problem),
        ctx_right_op=right_operator_rate(batch, demos),
    )
    return record, roll
