"""
context_grpo.py: the LL of HICRL (DESIGN.md §3.2, §4): each rollout i has its own context c_i, y_i ~ p_phi(. | x, c_i),
    r_i = R_task(x, y_i) + lambda * clip(log p_phi(y_i | x, c_i) - log q(y_i | x), -tau', tau'),
then GRPO on r_i with the log-probs and the KL to p_ref taken WITH the context; and ICPO (§7) as a mode.
"""

import os, time

import torch

import grpo
from grpo import (
    encode,
    fit_contexts,
    format_context,
    format_prompt,
    pad_completions,
    policy_update,
    sequence_logprobs,
)
from math_reward import carries_answer, right_operator_rate

# §4: the utilisation reward ------------------------------------------------------------------------------------------


def utilization_reward(logp_ctx, logp_prior, mask, tau, reduce="mean"):
    """U~_i = clip(reduce_t [log p_phi(y_t | x, c, y_<t) - log q(y_t | x, y_<t)], -tau', tau'), no gradient;
    reduce: the per-token mean (a KL rate) or the sum. (N, T) -> (N,)."""
    with torch.no_grad():
        d = (logp_ctx - logp_prior) * mask
        return (d.sum(1) if reduce == "sum" else d.sum(1) / mask.sum(1).clamp(min=1)).clamp(
            -tau, tau
        )


def utilisation(prior, tokenizer, batch, contexts, completions, sampler_logp, cfg):
    """U~_i of every rollout (B*G,): log p_phi is the sampler's own, log q one forward pass of the prior on x WITHOUT c.
    A rollout without a context gets 0. Returns (U~, stats)."""
    has = torch.tensor([c is not None for cs in contexts for c in cs])
    if not has.any():
        return torch.zeros(len(has)), {}
    rows = has.nonzero().squeeze(1).tolist()
    plain = [
        encode(tokenizer, format_prompt(tokenizer, p["problem"])) for p in batch
    ]  # x without c
    lp_ctx, mask = pad_completions([sampler_logp[i] for i in rows], value=0.0)
    with torch.no_grad():
        lp_q = sequence_logprobs(
            prior,
            [plain[i // cfg.group_size] for i in rows],
            [completions[i] for i in rows],
            cfg.temperature,
        )[0].cpu()
    u = utilization_reward(lp_ctx, lp_q, mask, cfg.tau, cfg.util_reduce)
    stats = {
        "util": u.mean().item(),
        "util_std": u.std(unbiased=False).item(),
        "util_clip": (u.abs() >= cfg.tau)
        .float()
        .mean()
        .item(),  # and its two halves, per-token means:
        "util_logp_ctx": grpo.masked_mean(
            lp_ctx, mask
        ).item(),  # which one moved (the context, or a sharper
        "util_logp_q": grpo.masked_mean(lp_q, mask).item(),
    }  # policy, or drift from q)
    return torch.zeros(len(has)).index_copy(0, torch.tensor(rows), u), stats


def ll_step(model, ref_model, prior, optimizer, tokenizer, batch, contexts, cfg, step, eos):
    """One LL update (§3.2 + §4): rollouts with contexts, r = R_task + lambda * U~, GRPO with the context.
    At lambda = 0 it is grpo.grpo_step on the same rollouts."""
    contexts, dropped = fit_contexts(tokenizer, batch, contexts, cfg.max_prompt_tokens)
    roll = grpo.rollouts(model, tokenizer, batch, contexts, cfg, step, eos)
    u, util_stats = (
        utilisation(
            prior, tokenizer, batch, contexts, roll["completions"], roll["sampler_logp"], cfg
        )
        if prior is not None
        else (torch.zeros(len(roll["rewards"])), {})
    )
    rewards = roll["rewards"] + cfg.lam * u  # r_i = R_task + lambda * U~_i
    adv = grpo.group_advantages(rewards, cfg.group_size, cfg.scale_by_std)
    t1 = time.time()
    stats = policy_update(
        model,
        ref_model,
        optimizer,
        roll["prompt_ids"],
        roll["completions"],
        adv,
        cfg,
        cfg.beta,
        cfg.max_new_tokens,
        cfg.temperature,
    )
    record = grpo.step_record(
        step, roll, rewards, stats, time.time() - t1, eos, cfg.group_size, ref_model
    )
    given = [
        c for cs in contexts for c in cs if c is not None
    ]  # what the contexts were, and the leakage
    has = torch.tensor([c is not None for cs in contexts for c in cs])
    leaks = [carries_answer(c, p["answer"]) for p, cs in zip(batch, contexts) for c in cs if c]
    record.update(
        util_stats,
        reward_task=roll["rewards"].mean().item(),
        acc_ctx=roll["acc"][has].mean().item() if has.any() else float("nan"),
        ctx_len=(
            sum(len(encode(tokenizer, format_context(c), target=True)) for c in given) / len(given)
        )
        if given
        else 0.0,
        ctx_frac=len(given) / (len(batch) * cfg.group_size),
        ctx_dropped=dropped,
        n_ctx=len(given),
        ctx_has_answer=sum(leaks) / len(leaks) if leaks else float("nan"),
        ctx_right_op=right_operator_rate(batch, contexts),
    )  # the ops tasks' context quality
    return record, {**roll, "rewards": rewards}


def ll_round_step(model, ref_model, prior, optimizer, tokenizer, batch, contexts, cfg, step, eos):
    """The LL update of a round: ICPO with the contexts as its demonstrations (--icpo), else ll_step."""
    if cfg.icpo:
        return icpo_step(model, ref_model, optimizer, tokenizer, batch, contexts, cfg, step, eos)
    return ll_step(model, ref_model, prior, optimizer, tokenizer, batch, contexts, cfg, step, eos)


def print_record(
    prefix, r, total
):  # one line per step; a rate that is NaN (nothing to count) is left out
    extra = "".join(
        f" {k} {r[k]:.3f}"
        for k in (
            "util",
            "util_clip",
            "accepted",
            "demo_missing",
            "parse_rate",
            "ctx_self",
            "ctx_has_answer",
            "ctx_right_op",
        )
        if k in r and r[k] == r[k]
    )
    print(
        f"{prefix} {r['step']}/{total} | reward {r['reward']:.3f} acc {r['acc']:.3f} boxed {r['boxed']:.2f}"
        f"{extra} | len {r['len']:.0f} fin {r['finished']:.2f} | zero-var {r['zero_var']:.2f} | kl {r['kl']:.4f} "
        f"clip {r['clip_frac']:.3f} | loss {r['loss']:+.4f} gnorm {r['grad_norm']:.2f} | {r['time']:.1f}s"
    )


def check_flags(cfg):
    """The LL's flags that contradict each other: one message before anything loads."""
    path = lambda name: (
        "smollm2" if name in ("", "smollm2") else os.path.realpath(grpo.resolve_model(name))
    )
    if cfg.icpo and cfg.n_off > cfg.group_size - 1:
        raise SystemExit(
            "--n-off: at most --group-size - 1 (an accepted IEF rollout replaces an on-policy one)"
        )
    if (
        cfg.prior == "base"
        and not cfg.icpo
        and path(cfg.base_model or cfg.model) == path(cfg.ll_init or cfg.model)
    ):
        raise SystemExit(
            "--prior base: the base model is phi_0, q would be --prior init's: pass --base-model"
        )


def make_prior(model, cfg):
    """(p_ref, q): p_ref = phi_0 frozen (None at --beta 0); q = init: that same frozen phi_0 (one copy, made before a
    resume loads phi_t), base: the pretrained --base-model, frozen, self: the current LL (a reward: no gradient)."""
    phi0 = grpo.frozen_copy(model) if cfg.beta > 0 or cfg.prior == "init" else None
    if cfg.prior == "base":
        q, _ = grpo.load_model(
            cfg.base_model or cfg.model,
            model.device,
            trainable=True,
            precision=cfg.precision,
            flag="--base-model" if cfg.base_model else "--model",
        )
        q.eval().requires_grad_(False)
    else:
        q = phi0 if cfg.prior == "init" else model
    return phi0 if cfg.beta > 0 else None, q


# §7: ICPO ------------------------------------------------------------------------------------------------------------


def expert_bonus(beta, step, total_steps):
    """Annealed expert bonus beta * (1 - t/T) at step t = 0..T-1, 0 from t = T on (a resume that adds steps)."""
    return beta * max(0.0, 1.0 - step / max(total_steps, 1))


def errs_merge(off_problem, off_correct, n_problems, group_size):
    """Expert-region reject sampling: a correct IEF rollout j (of problem off_problem[j]) replaces the last unreplaced
    on-policy row of its own group, at most G-1 of them; a wrong one is dropped. Returns ({row: j}, rejected)."""
    replace, used = {}, [0] * n_problems
    for j, (b, ok) in enumerate(zip(off_problem, off_correct)):
        if ok and used[b] < group_size - 1:
            replace[(b + 1) * group_size - 1 - used[b]] = j
            used[b] += 1
    return replace, len(off_problem) - len(replace)


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
    """ICPO's mixed loss (§7): the clipped surrogate on on-policy rows, -A p / (p + gamma) on IEF rows, + beta k3."""
    return grpo.grpo_loss(
        logp, old_logp, ref_logp, advantages, mask, clip_eps, beta, norm, max_len, is_off, gamma
    )


def icpo_step(model, ref_model, optimizer, tokenizer, batch, demos, cfg, step, eos):
    """One ICPO step: G on-policy rollouts y ~ p(. | x) and, per demonstration D (demos: per problem, None = none),
    one IEF rollout y ~ p(. | [D; x]); ERRS, the annealed bonus, std-scaled advantages, every log-prob WITHOUT D."""
    G, B, t0 = cfg.group_size, len(batch), time.time()
    demos = fit_contexts(tokenizer, batch, demos, cfg.max_prompt_tokens)[0]
    plain = [encode(tokenizer, format_prompt(tokenizer, p["problem"])) for p in batch]
    off_problem = [
        b for b, ds in enumerate(demos) for d in ds if d is not None
    ]  # IEF row -> problem
    off_demos = [d for ds in demos for d in ds if d is not None]
    guided = [
        encode(tokenizer, format_prompt(tokenizer, batch[b]["problem"], d))
        for b, d in zip(off_problem, off_demos)
    ]
    completions, _ = grpo.generate(
        model,
        [plain[b] for b in range(B) for _ in range(G)] + guided,
        cfg.max_new_tokens,
        cfg.temperature,
        eos,
        seed=grpo.stream_seed(cfg.seed, "ll", step),
    )
    t_sample, n_sampled = time.time() - t0, sum(map(len, completions))
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    golds = [p["answer"] for p in batch for _ in range(G)] + [
        batch[b]["answer"] for b in off_problem
    ]
    rewards_all, acc_all, boxed_all, wrote_all = grpo.score(texts, golds, cfg.format_bonus)
    replace, rejected = errs_merge(
        off_problem, [a >= cfg.delta for a in acc_all[B * G :].tolist()], B, G
    )  # 1. ERRS
    src = [
        B * G + replace[i] if i in replace else i for i in range(B * G)
    ]  # row -> index into the sampled rows
    is_off = torch.tensor([i >= B * G for i in src])
    bonus = expert_bonus(cfg.icpo_bonus, step, cfg.bonus_steps)
    rewards = rewards_all[src] + bonus * is_off.float()  # 2. the annealed bonus
    adv = grpo.group_advantages(rewards, G, scale_by_std=True)  # 3. (r - mean) / std
    train_prompts = [plain[b] for b in range(B) for _ in range(G)]  # 4. log-probs without D
    t1 = time.time()
    stats = policy_update(
        model,
        ref_model,
        optimizer,
        train_prompts,
        [completions[i] for i in src],
        adv,
        cfg,
        cfg.beta,
        cfg.max_new_tokens,
        cfg.temperature,
        is_off=is_off,
        gamma=cfg.gamma,
    )
    roll = {
        "prompt_ids": train_prompts,
        "completions": [completions[i] for i in src],
        "texts": [texts[i] for i in src],
        "acc": acc_all[src],
        "boxed": boxed_all[src],
        "wrote_box": wrote_all[src],
        "rewards": rewards,
        "t0": t0,
        "t_sample": t_sample,
    }
    record = grpo.step_record(step, roll, rewards, stats, time.time() - t1, eos, G, ref_model)
    record.update(
        acc_on=acc_all[: B * G].mean().item(),
        acc_ief=acc_all[B * G :].mean().item() if off_problem else float("nan"),
        accepted=len(replace),
        rejected=rejected,
        bonus=bonus,
        sample_tok_s=n_sampled / t_sample,
        n_ief=len(off_problem),
        demo_missing=sum(map(len, demos)) - len(off_problem),
        ctx_right_op=right_operator_rate(batch, demos),
    )
    return record, roll
