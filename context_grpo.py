"""
context_grpo.py: context-conditioned GRPO with the context-utilisation reward (DESIGN.md §3.2, §4, HICRL's
lower level), and ICPO, in-context steered policy optimisation (§7), as a mode.

    python context_grpo.py --context retrieved --lam 0.1          # LL alone, retrieved worked examples
    python context_grpo.py --context retrieved --lam 0             # the lambda = 0 ablation (plain GRPO reward)
    python context_grpo.py --icpo                                  # ICPO, a random training pair as D (§7)
    python context_grpo.py --resume runs/context_grpo

HICRL's LL (§3.2, §4): each rollout i of x has its own context c_i and y_i ~ p_phi(. | x, c_i); then

    r_i = R_task(x, y_i) + lambda * clip( log p_phi(y_i | x, c_i) - log q(y_i | x), -tau', tau' )

(utilization_reward: the per-token mean of the log-ratio by default, --util-reduce sum for the sum;
symmetric clip; no gradient: it is a reward) and standard GRPO on r_i, with the log-probs and the KL
to p_ref both taken WITH the context (ll_step). q is the frozen initial LL (`init`, the very same
frozen module as p_ref), the pretrained base model (`base`), or the current LL without context (`self`).

ICPO (§7; arXiv 2510.26519): per problem, G on-policy rollouts y ~ p(. | x) and n_off "implicit expert
forcing" (IEF) rollouts y ~ p(. | [D; x]) with a demonstration D prepended. Then
    1. expert-region reject sampling (ERRS): an IEF rollout joins the group only if it is correct
       (R >= delta = 1); it replaces one on-policy rollout (the last ones: they are exchangeable), so the
       group keeps G rows; a wrong one is dropped; both are counted;
    2. annealed expert bonus: an accepted IEF rollout's reward is R + beta_E * (1 - t/T), t = 0..T-1, T the
       run's total steps, fixed at its start (a resume with more --steps does not re-stretch the schedule);
    3. advantages (r - mean) / std over the mixed group;
    4. every log-prob of an IEF rollout (current, old, reference) is taken WITHOUT D, as p(y | x): sample
       with the demonstration, train the context-free policy;
    5. loss: the clipped surrogate on on-policy tokens; on IEF tokens the unclipped policy-shaping term
       -A * f(p), f(p) = p / (p + gamma), p = exp(logp_new), gamma = 0.1; a small KL to p_ref (--beta 0.001
       in their runs; our default stays grpo's 0.04 unless given).
Where this differs from the paper and its public code, numbered:
    1. "Hybrid policy initialisation" (named in the seed's summary) has no separate step in the paper's
       method or code that we know of; we read it as the mixed group itself (on-policy + IEF rows).
    2. D is a random training problem with its reference solution (their default), or a retrieved
       neighbour with --context retrieved; alternate.py can put an HL context in its place.
    3. Which on-policy rollout an accepted IEF one replaces is not specified; we replace the last ones.
"""
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import grpo
from grpo import (arg, as_example, encode, fit_contexts, format_context, format_prompt, generate,
                  group_advantages, normalize_text, pad_completions, parse_config, policy_update, restates, retrieve, score,
                  sequence_logprobs, stream_seed)

# -----------------------------------------------------------------------------
# context sources: retrieved neighbours (TF-IDF, numpy only), random examples, none


def context_source(kind, problems, seed=0):
    """contexts(batch, G, step) -> per problem, G contexts. `none`: no context; `retrieved`: the nearest
    training neighbour (TF-IDF, same subject, never itself) for all G rollouts; `random`: a random other
    training problem per rollout (seeded by the step; one that restates x is no context)."""
    if kind == "none":
        return lambda batch, G, step: [[None] * G for _ in batch]
    if kind == "retrieved":
        lookup = {normalize_text(p["problem"]): c for p, c in zip(problems, retrieve(problems, problems))}
        return lambda batch, G, step: [[lookup.get(normalize_text(p["problem"]))] * G for p in batch]
    if kind == "random":
        def random_contexts(batch, G, step):
            rng = np.random.default_rng(stream_seed(seed, "demo", step))
            out = []
            for p in batch:
                picks = [problems[j] for j in rng.integers(0, len(problems), size=G)]
                out.append([None if restates(q["problem"], p["problem"]) else as_example(q) for q in picks])
            return out
        return random_contexts
    raise ValueError(f"unknown context source {kind!r} (none, retrieved, random)")


# -----------------------------------------------------------------------------
# §4: the utilisation reward


def utilization_reward(logp_ctx, logp_prior, mask, tau, reduce="mean"):
    """U~_i = clip( reduce_t [ log p_phi(y_t | x, c, y_<t) - log q(y_t | x, y_<t) ], -tau', tau' ), no gradient.
    reduce = "mean": per-token mean over the completion (a KL rate: long answers do not dominate);
    "sum": the sequence log-ratio. logp_ctx, logp_prior, mask: (N, T). Returns (N,)."""
    with torch.no_grad():
        d = (logp_ctx - logp_prior) * mask                                   # (N, T)
        u = d.sum(1) if reduce == "sum" else d.sum(1) / mask.sum(1).clamp(min=1)
        return u.clamp(-tau, tau)


def utilisation(prior, tokenizer, batch, contexts, completions, sampler_logp, cfg):
    """U~_i for every rollout (B*G,), with log p_phi the sampler's own log-prob of y_i under (x, c_i) and
    log q one forward pass of the prior on (x without c, y_i); and its statistics. A rollout without a
    context gets U~ = 0: U is defined for a context (§4); without one the log-ratio would only measure the
    LL's drift from q, and rewarding that is not the method."""
    has = torch.tensor([c is not None for cs in contexts for c in cs])      # (B*G,)
    if not has.any():
        return torch.zeros(len(has)), {}
    rows = has.nonzero().squeeze(1).tolist()
    plain = [encode(tokenizer, format_prompt(tokenizer, p["problem"])) for p in batch]  # x without c
    lp_ctx, mask = pad_completions([sampler_logp[i] for i in rows], value=0.0)
    with torch.no_grad():
        lp_q, _ = sequence_logprobs(prior, [plain[i // cfg.group_size] for i in rows],
                                    [completions[i] for i in rows], cfg.temperature)
    u = utilization_reward(lp_ctx, lp_q.cpu(), mask, cfg.tau, cfg.util_reduce)
    stats = {"util": u.mean().item(), "util_std": u.std(unbiased=False).item(),
             "util_clip": (u.abs() >= cfg.tau).float().mean().item()}
    return torch.zeros(len(has)).index_copy(0, torch.tensor(rows), u), stats


def ll_step(model, ref_model, prior, optimizer, tokenizer, batch, contexts, cfg, step, eos):
    """One LL update of HICRL (§3.2 + §4): rollouts with contexts, r = R_task + lambda * U~, GRPO.
    With lambda = 0 the rewards, advantages and loss are exactly grpo.grpo_step's on the same rollouts."""
    contexts, dropped = fit_contexts(tokenizer, batch, contexts, cfg.max_prompt_tokens)
    # 1-2. rollouts y_i ~ p_phi(. | x, c_i) and R_task (+ the format bonus)
    roll = grpo.rollouts(model, tokenizer, batch, contexts, cfg, step, eos)
    # 3. the utilisation term and the shaped reward (§4.4), then group advantages
    # (measured whenever there is a prior, so lambda = 0 logs the utilisation it does not reward)
    u, util_stats = (utilisation(prior, tokenizer, batch, contexts, roll["completions"], roll["sampler_logp"], cfg)
                     if prior is not None else (torch.zeros(len(roll["rewards"])), {}))
    rewards = roll["rewards"] + cfg.lam * u                                  # r_i = R_task + lambda * U~_i
    adv = group_advantages(rewards, cfg.group_size, cfg.scale_by_std)
    # 4. policy update: log-probs and KL to p_ref WITH the context (§3.2)
    t1 = time.time()
    stats = policy_update(model, ref_model, optimizer, roll["prompt_ids"], roll["completions"], adv, cfg,
                          cfg.beta, cfg.max_new_tokens, cfg.temperature)
    record = grpo.step_record(step, roll, rewards, stats, time.time() - t1, eos, cfg.group_size, ref_model)
    # 5. what the contexts were: how many, how long, how often they carried x's own answer (leakage)
    given = [c for cs in contexts for c in cs if c is not None]
    has = torch.tensor([c is not None for cs in contexts for c in cs])
    leaks = [grpo.carries_answer(c, p["answer"]) for p, cs in zip(batch, contexts) for c in cs if c]
    record.update(util_stats, reward_task=roll["rewards"].mean().item(),
                  acc_ctx=roll["acc"][has].mean().item() if has.any() else float("nan"),  # rollouts that had one
                  ctx_len=(sum(len(encode(tokenizer, format_context(c))) for c in given) / len(given)) if given else 0.0,
                  ctx_frac=len(given) / (len(batch) * cfg.group_size), ctx_dropped=dropped,
                  ctx_has_answer=sum(leaks) / len(leaks) if leaks else float("nan"))
    roll.update(rewards=rewards, context=contexts[0][0])  # the shaped rewards, and a context for the sample log
    return record, roll


def make_prior(kind, model, phi0, cfg):
    """q(y | x): `init` = phi0, the frozen initial LL, the same module as p_ref (one frozen copy, not two; it
    is copied before a resumed run loads its checkpoint, so q stays phi_0, not phi_t); `base` = the
    pretrained base model (--base-model); `self` = the current LL itself (no gradient flows: a reward)."""
    if kind == "init":
        if phi0 is None:
            raise ValueError("prior init needs the frozen initial LL (phi0), copied before any checkpoint is loaded")
        return phi0
    if kind == "base":
        base, _ = grpo.load_model(cfg.base_model or cfg.model, device=model.device, precision=cfg.precision,
                                  trainable=True, flag="--base-model" if cfg.base_model else "--model")
        return base.eval().requires_grad_(False)  # loaded as the policy is (its path, its precision), frozen
    if kind == "self":
        return model
    raise ValueError(f"unknown prior {kind!r} (init, base, self)")

# -----------------------------------------------------------------------------
# §7: ICPO


def expert_bonus(beta, step, total_steps):
    """Annealed expert bonus beta * (1 - t/T) at step t = 0..T-1 (DESIGN §7): beta at the first step, beta/T at the
    last, 0 from t = T on (a resumed run that adds steps)."""
    return beta * max(0.0, 1.0 - step / total_steps)


def errs_merge(off_problem, off_correct, n_problems, group_size):
    """Expert-region reject sampling. off_problem[j]: the problem (0..B-1) of IEF rollout j; off_correct[j]:
    whether it is correct. A correct IEF rollout replaces the last not-yet-replaced on-policy row of ITS
    OWN problem's group (rows b*G .. b*G+G-1); a wrong one is dropped. At most G-1 rows of a group are
    replaced: one on-policy rollout always stays. Returns (replace: {row: IEF index}, rejected count)."""
    replace, used = {}, [0] * n_problems
    for j, (b, ok) in enumerate(zip(off_problem, off_correct)):
        if ok and used[b] < group_size - 1:
            replace[(b + 1) * group_size - 1 - used[b]] = j
            used[b] += 1
    return replace, len(off_problem) - len(replace)


def icpo_loss(logp, old_logp, ref_logp, advantages, mask, is_off, clip_eps, beta, gamma, norm="seq", max_len=None):
    """ICPO's mixed loss (§7), per token: on-policy rows the clipped surrogate; IEF rows (is_off, (N,) bool) the
    unclipped shaping term -A * f(p), f(p) = p / (p + gamma), p = exp(logp); plus beta * k3 KL on every row.
    It is grpo.grpo_loss with the is_off mask (written there, beside the surrogate it replaces)."""
    return grpo.grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, beta, norm, max_len, is_off, gamma)


def icpo_step(model, ref_model, optimizer, tokenizer, batch, demos, cfg, step, eos):
    """One ICPO step: G on-policy + n_off IEF rollouts per problem, ERRS, annealed bonus, std-scaled group
    advantages, the mixed loss with every log-prob taken without the demonstration. demos: per problem,
    n_off demonstrations; a None (an HL output that did not parse, or restated x) gives no IEF rollout:
    without a demonstration it would be an ordinary on-policy sample. Counted as `demo_missing`."""
    G, B = cfg.group_size, len(batch)
    t0 = time.time()
    plain = [encode(tokenizer, format_prompt(tokenizer, p["problem"])) for p in batch]
    off_problem = [b for b, ds in enumerate(demos) for d in ds if d is not None]           # IEF row -> problem
    guided = [encode(tokenizer, format_prompt(tokenizer, batch[b]["problem"], d))
              for b, ds in enumerate(demos) for d in ds if d is not None]
    rows = [plain[b] for b in range(B) for _ in range(G)] + guided            # (B*G + IEF) sampling prompts
    completions, _ = generate(model, rows, cfg.max_new_tokens, cfg.temperature, cfg.top_p, eos,
                              seed=stream_seed(cfg.seed, "ll", step))
    t_sample = time.time() - t0
    n_sampled = sum(len(c) for c in completions)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    golds = [p["answer"] for p in batch for _ in range(G)] + [batch[b]["answer"] for b in off_problem]
    rewards_all, acc_all, boxed_all, wrote_all = score(texts, golds, cfg.format_bonus)
    # 1. ERRS: a correct IEF rollout replaces an on-policy row of its own problem's group
    replace, rejected = errs_merge(off_problem, [a >= cfg.delta for a in acc_all[B * G:].tolist()], B, G)
    src = list(range(B * G))                                                  # row -> index into the sampled rows
    for row, j in replace.items():
        src[row] = B * G + j
    completions, texts = [completions[i] for i in src], [texts[i] for i in src]
    acc, boxed, wrote = acc_all[src], boxed_all[src], wrote_all[src]
    is_off = torch.tensor([i >= B * G for i in src])                          # (B*G,)
    # 2. rewards with the annealed expert bonus on accepted IEF rows
    bonus = expert_bonus(cfg.icpo_bonus, step, cfg.bonus_steps or cfg.steps)
    rewards = rewards_all[src] + bonus * is_off.float()
    # 3. advantages over the mixed group, (r - mean) / std
    adv = group_advantages(rewards, G, scale_by_std=True)
    # 4. update: every row's log-probs WITHOUT the demonstration, the ICPO loss (grpo_loss with is_off)
    train_prompts = [plain[b] for b in range(B) for _ in range(G)]
    t1 = time.time()
    stats = policy_update(model, ref_model, optimizer, train_prompts, completions, adv, cfg, cfg.beta,
                          cfg.max_new_tokens, cfg.temperature, is_off=is_off, gamma=cfg.gamma)
    # the logged sample: group 0's accepted IEF rollout (its last row) with its demonstration, else row 0, no context
    show = G - 1 if G - 1 in replace else 0
    off_demos = [d for ds in demos for d in ds if d is not None]
    roll = {"prompt_ids": train_prompts, "completions": completions, "texts": texts, "acc": acc, "boxed": boxed,
            "wrote_box": wrote, "rewards": rewards, "t0": t0, "t_sample": t_sample, "sample_row": show,
            "context": off_demos[replace[show]] if show in replace else None}
    record = grpo.step_record(step, roll, rewards, stats, time.time() - t1, eos, G, ref_model)
    record.update(acc_on=acc_all[:B * G].mean().item(),
                  acc_ief=acc_all[B * G:].mean().item() if off_problem else float("nan"),
                  accepted=len(replace), rejected=rejected, demo_missing=sum(map(len, demos)) - len(off_problem),
                  bonus=bonus, sample_tok_s=n_sampled / t_sample)  # every sampled row, rejected IEF ones too
    return record, roll

# -----------------------------------------------------------------------------
# the LL alone with a context source


@dataclass
class Config(grpo.Config):
    HIDDEN = ("bonus_steps",)
    out: str = arg("runs/context_grpo", "run folder: config.json, metrics.jsonl, samples.jsonl, ckpt/")
    context: str = field(default="random", metadata={
        "help": "context source (ICPO's D): random (a training pair, DESIGN §7), retrieved (TF-IDF neighbour), none "
                "(ICPO: random)",
        "choices": ["retrieved", "random", "none"]})
    lam: float = arg(0.1, "lambda: weight of the utilisation reward (0 = off, the plain GRPO reward)", ge=0)
    tau: float = arg(1.0, "tau': symmetric clip of the utilisation log-ratio", gt=0)
    util_reduce: str = field(default="mean", metadata={
        "help": "utilisation over tokens: mean (a KL rate) or sum", "choices": ["mean", "sum"]})
    prior: str = field(default="init", metadata={
        "help": "q: init (frozen phi_0, shared with p_ref), base (--base-model), self (current LL, detached)",
        "choices": ["init", "base", "self"]})
    base_model: str = arg("", "the pretrained base model for --prior base (default: --model)")
    icpo: bool = arg(False, "ICPO mode: G on-policy + n_off IEF rollouts with a demonstration, ERRS, bonus")
    n_off: int = arg(1, "ICPO: IEF rollouts per problem (at most G - 1: one on-policy rollout stays)", ge=0)
    icpo_bonus: float = arg(0.5, "ICPO: expert bonus beta_E, annealed as beta_E * (1 - t/T) over the run's T steps", ge=0)
    gamma: float = arg(0.1, "ICPO: shaping f(p) = p / (p + gamma) on IEF tokens", gt=0)
    delta: float = arg(1.0, "ICPO: ERRS acceptance threshold on R_task", ge=0, le=1)
    bonus_steps: int = arg(0, "ICPO: T of the annealed bonus, the run's total steps at its start (kept on resume)", ge=0)

    def check(self):
        super().check()
        self.bonus_steps = self.bonus_steps or self.steps
        if self.prior == "base" and not self.icpo:  # q = the pretrained base model: refused when it would load phi_0's own weights
            key = lambda name: "smollm2" if name in ("", "smollm2") else os.path.realpath(grpo.resolve_model(name))
            phi0 = getattr(self, "ll_init", "") or self.model
            if key(self.base_model or self.model) == key(phi0):
                raise SystemExit(f"--prior base: the base model ({self.base_model or self.model}) is phi_0 ({phi0}): q "
                                 f"would be --prior init's; pass --base-model (the model phi_0 was trained from), or "
                                 f"--ll-init (a trained phi_0) with alternate.py")
        if self.icpo and self.n_off > self.group_size - 1:
            raise SystemExit(f"--n-off {self.n_off}: must be <= --group-size - 1 = {self.group_size - 1} (an accepted IEF "
                             f"rollout replaces an on-policy row of its own group, and one on-policy row stays)")


def main(cfg):
    out, model, tokenizer, phi0, optimizer, step, problems, eos = grpo.setup(
        cfg, keep_phi0=not cfg.icpo and cfg.prior == "init")
    ref_model = phi0 if cfg.beta > 0 else None
    if cfg.icpo:
        kind = "random" if cfg.context == "none" else cfg.context
        prior, source = None, context_source(kind, problems, cfg.seed)
        print(f"ICPO: {len(problems)} problems, {cfg.batch_problems} x ({cfg.group_size} on-policy + {cfg.n_off} IEF "
              f"with a demonstration D: {'a random training pair' if kind == 'random' else 'the retrieved neighbour'}), "
              f"{cfg.steps} steps")
    else:
        prior, source = make_prior(cfg.prior, model, phi0, cfg), context_source(cfg.context, problems, cfg.seed)
        print(f"context GRPO: {len(problems)} problems, {cfg.batch_problems} x {cfg.group_size} rollouts, context "
              f"{cfg.context}, lambda {cfg.lam}, tau' {cfg.tau}, prior {cfg.prior}, {cfg.steps} steps; the printed "
              f"loss is ~0 on-policy by construction: watch reward, acc and util")

    def step_fn(batch, t):
        if cfg.icpo:  # n_off demonstrations per problem, fitted to the prompt budget
            demos = fit_contexts(tokenizer, batch, source(batch, cfg.n_off, t), cfg.max_prompt_tokens)[0]
            return icpo_step(model, ref_model, optimizer, tokenizer, batch, demos, cfg, t, eos)
        return ll_step(model, ref_model, prior, optimizer, tokenizer, batch, source(batch, cfg.group_size, t), cfg,
                       t, eos)
    grpo.train_loop(cfg, out, step, problems, step_fn, {"policy": model}, {"policy": optimizer}, tokenizer)


if __name__ == "__main__":
    main(parse_config(Config))
