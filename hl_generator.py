"""
hl_generator.py: the higher level, the context generator pi_theta(c | x) (DESIGN.md §5).

    python hl_generator.py sft --data ../shared/data/math_train.jsonl --out runs/hl_sft   # D_SFT, then SFT
    python hl_generator.py sample --model runs/hl_sft --data ../shared/data/math_train.jsonl
    python hl_generator.py train --model runs/hl_sft --ll-model smollm2 --steps 20        # HL RL, LL frozen

The HL reads a problem x and writes ONE related worked example c = (x', y') in a fixed format,
"Problem: ...\\nSolution: ... \\boxed{...}" (grpo.format_context writes it, parse_context reads it back).

    5.3 D_SFT: each training x paired with its nearest real neighbour (x', y') (TF-IDF cosine over the
        problem text, same subject, never x itself, never a MATH-500 problem); theta_0 = SFT on D_SFT,
        the loss on the target tokens only (sft_loss).
    5.1 R_HL(x, c) = R_task(x, y) + alpha * (1/|y|) sum_t log p_phi(y_t | x, c, y_<t),  y ~ p_phi(. | x, c):
        the confidence form of R_task - alpha * H(p_phi(. | x, c)), with the per-token mean log-prob of the
        sampled answer (hl_reward), averaged over M answers of the frozen LL.
    5.2 maximise E[R_HL] - beta_HL * KL(pi_theta || pi_SFT): for each x, G contexts, group advantages over
        them, the clipped surrogate on the context tokens, k3 KL to the frozen pi_SFT (grpo.policy_update).

Rules, numbered:
    1. An HL output that does not parse (no "Problem:", no "Solution:", or no boxed answer: e.g. cut off
       by the token budget) becomes NO context: the LL answers the bare problem. It is counted
       (`parse_rate` in every log line) and still scored, so the HL's reward for it is the LL's reward
       without help; the format itself is taught by SFT and held by the KL to pi_SFT.
    1b. The leakage guard: an output whose problem RESTATES x (the same text after normalising case,
       whitespace, `$` and LaTeX spacing, or the same bag of words: cosine >= --self-threshold, 0.9 by
       default; grpo.restates) is no context either, by rule 1, and is counted apart as `ctx_self`.
       Otherwise R_HL would pay the HL for writing the test problem with its answer, and the LL would
       learn to copy (seen on `arith` before this guard: every right answer of experiment 5 came from a
       context that restated x or its mirror "9 + 1" for "1 + 9"). D_SFT never pairs x with a
       restatement of itself either (grpo.nearest_neighbours).
    2. The HL and the LL share one tokenizer (both come from the same base model).
    3. "Pretrained HL" (experiments 2 and 3) is the base model prompted with the same format, no SFT.
"""
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

import grpo
from grpo import (arg, as_example, encode, format_context, format_prompt, generate, group_advantages, holdout_filter,
                  nearest_neighbours, restates, score, sequence_logprobs, stream_seed)
from math_reward import extract_boxed

# -----------------------------------------------------------------------------
# §5.3 the HL's prompt, its output format, D_SFT


HL_INSTRUCTION = ("Write ONE worked example that would help a student solve the problem below: a related but "
                  "different problem, and its step-by-step solution ending with the final answer in \\boxed{}. "
                  "Use exactly this format:\nProblem: <the related problem>\nSolution: <its solution>")


def hl_prompt(tokenizer, problem):
    """The HL's prompt for x (the chat template where the tokenizer has one)."""
    return grpo.as_chat(tokenizer, HL_INSTRUCTION + "\n\nThe problem:\n" + problem.strip(), "\n\n")


_PROBLEM = re.compile(r"problem\s*\**\s*:", re.IGNORECASE)
_SOLUTION = re.compile(r"solution\s*\**\s*:", re.IGNORECASE)


def parse_context(text, problem=None, self_threshold=0.9):
    """(problem, solution) from an HL output "Problem: ... Solution: ... \\boxed{...}", or None when it does
    not parse: no "Problem:", no "Solution:" after it, an empty part, or no boxed final answer. With
    `problem` (x) given, also None when the example's problem restates x (rule 1b)."""
    if not text:
        return None
    p = _PROBLEM.search(text)
    if p is None:
        return None
    s = _SOLUTION.search(text, p.end())
    if s is None:
        return None
    example, solution = text[p.end():s.start()].strip(" *\n\t"), text[s.end():].strip(" *\n\t")
    if not example or not solution or extract_boxed(solution) is None:
        return None
    if problem is not None and restates(example, problem, self_threshold):
        return None
    return example, solution


def build_sft_pairs(train_problems, holdout_problems=()):
    """D_SFT: [(x, (x', y'))], x' the nearest neighbour of x in the training set by TF-IDF cosine, same
    subject when given, never x itself, never a held-out problem (neither as x nor as x')."""
    held = holdout_filter(holdout_problems)
    train = [p for p in train_problems if not held(p)]
    nn = nearest_neighbours(train, train, k=1, exclude=held)[:, 0]
    return [(x, as_example(train[j])) for x, j in zip(train, nn) if j >= 0]

# -----------------------------------------------------------------------------
# SFT: theta_0


def sft_loss(model, prompt_ids, target_ids, n_tokens=None):
    """Mean negative log-likelihood of the target tokens given the prompt, over n_tokens (default: these
    rows' target tokens). The prompt tokens are not in the completion, so their loss weight is 0 by
    construction (the completion mask of grpo.py)."""
    logp, mask = sequence_logprobs(model, prompt_ids, target_ids)
    return -(logp * mask).sum() / (mask.sum() if n_tokens is None else n_tokens)


def sft_step(model, optimizer, prompt_ids, target_ids):
    """One SFT update on a batch: the mean NLL over all of its target tokens. Under torchrun each rank takes
    its share of the pairs and divides by the whole batch's token count over the world size, so the averaged
    gradient is one process's on the whole batch. Returns the batch's loss."""
    n_tokens = sum(len(t) for t in target_ids) / grpo.world_size()
    loss = sft_loss(model, grpo.my_share(prompt_ids), grpo.my_share(target_ids), n_tokens)
    loss.backward()
    grpo.average_gradients(model)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grpo.reduce_record({"loss": loss.item()})["loss"]


def sft_examples(tokenizer, pairs, max_context_tokens, eos_id):
    """Token ids: the HL prompt of x, and the target "Problem: x'\\nSolution: y'" + EOS, cut to the budget
    (counted: a cut target teaches a cut format, so it is dropped instead); and the indices of the pairs kept."""
    prompts, targets, kept = [], [], []
    for i, (x, example) in enumerate(pairs):
        target = encode(tokenizer, format_context(example)) + [eos_id]
        if len(target) > max_context_tokens:
            continue
        prompts.append(encode(tokenizer, hl_prompt(tokenizer, x["problem"])))
        targets.append(target)
        kept.append(i)
    if len(kept) < len(pairs):
        print(f"SFT: dropped {len(pairs) - len(kept)} of {len(pairs)} pairs whose target exceeds {max_context_tokens} tokens"
              + (" (most of D_SFT: raise --max-context-tokens, e.g. 384 for MATH)" if len(kept) < len(pairs) / 2 else ""))
    return prompts, targets, kept


def sft_order(n, n_held, batch, steps, seed):
    """D_SFT's order: a seeded permutation of its n pairs, the first n_held held out; step t's batch is
    grpo.batch_indices over the rest (a pure function of t). Returns (held-out indices, per step its indices)."""
    perm = np.random.default_rng([seed, grpo.PURPOSES.index("sft")]).permutation(n).tolist()  # the same on every rank
    held, train = perm[:n_held], perm[n_held:]
    return held, [[train[i] for i in grpo.batch_indices(len(train), batch, t, seed)] for t in range(steps)]


def subjects(pairs, idx):
    """'k subjects (A n, B m, ...)' of the pairs' problems x at these indices: what the SFT saw."""
    counts = Counter(str(pairs[i][0].get("subject")) for i in idx).most_common()
    return f"{len(counts)} subjects (" + ", ".join(f"{k} {v}" for k, v in counts) + ")"


def sft(model, tokenizer, pairs, cfg, eos_id, log=print):
    """Supervised fine-tuning of the HL on D_SFT: AdamW, cfg.sft_batch pairs per step drawn by sft_order, cfg.sft_steps
    steps, loss on the target tokens only; the held-out loss (cfg.sft_heldout pairs) before and after.
    Under torchrun every rank holds every pair and takes its share of each step's (sft_step)."""
    prompts, targets, kept = sft_examples(tokenizer, pairs, cfg.max_context_tokens, eos_id)
    if len(prompts) < 2:
        raise SystemExit(f"SFT: {len(prompts)} of {len(pairs)} D_SFT pairs fit --max-context-tokens "
                         f"{cfg.max_context_tokens}: raise it (or use data with shorter solutions)")
    held, batches = sft_order(len(prompts), min(cfg.sft_heldout, len(prompts) // 5), cfg.sft_batch, cfg.sft_steps,
                              cfg.seed)
    hp, ht = [prompts[i] for i in held], [targets[i] for i in held]
    log(f"SFT: subjects of D_SFT: {subjects(pairs, kept)}; of the held-out pairs: "
        f"{subjects(pairs, [kept[i] for i in held])}; of the pairs the steps draw: "
        f"{subjects(pairs, [kept[i] for b in batches for i in b])}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)

    def heldout():
        if not hp:
            return float("nan")
        with torch.no_grad():
            return sum(sft_loss(model, hp[i:i + 8], ht[i:i + 8]).item() * len(hp[i:i + 8])
                       for i in range(0, len(hp), 8)) / len(hp)

    log(f"SFT: {len(prompts) - len(hp)} train pairs, {len(hp)} held out, {cfg.sft_steps} steps of {cfg.sft_batch}; "
        f"held-out loss before {heldout():.3f}")
    model.train()
    t0 = time.time()
    for step in range(cfg.sft_steps):
        loss = sft_step(model, opt, [prompts[i] for i in batches[step]], [targets[i] for i in batches[step]])
        if (step + 1) % max(1, cfg.sft_steps // 10) == 0 or step == cfg.sft_steps - 1:
            left = (time.time() - t0) / (step + 1) * (cfg.sft_steps - step - 1)
            log(f"SFT step {step + 1}/{cfg.sft_steps} | loss {loss:.3f} | ~{left:.0f}s left")
    model.eval()
    after = heldout()
    log(f"SFT: held-out loss after {after:.3f}")
    return after

# -----------------------------------------------------------------------------
# contexts from the HL, §5.1 the HL reward, §5.2 the HL update


@torch.no_grad()
def generate_contexts(hl_model, tokenizer, problems, n, max_tokens, temperature, eos, seed=None, self_threshold=0.9):
    """n contexts per problem from pi_theta (greedy at temperature 0). Returns (contexts: per problem n
    parsed (x', y') or None (rules 1 and 1b), hl prompt ids per row, completion ids per row, stats:
    parse_rate = the fraction of outputs in the format, ctx_self = the fraction that restated x; the LL
    gets a context for parse_rate - ctx_self of them)."""
    prompt_ids = [encode(tokenizer, hl_prompt(tokenizer, p["problem"])) for p in problems for _ in range(n)]
    completions, _ = generate(hl_model, prompt_ids, max_tokens, temperature, 1.0, eos, seed=seed)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    xs = [p["problem"] for p in problems for _ in range(n)]
    formatted = [parse_context(t) for t in texts]                                           # rule 1
    parsed = [None if c is None or restates(c[0], x, self_threshold) else c for c, x in zip(formatted, xs)]  # 1b
    contexts = [parsed[i * n:(i + 1) * n] for i in range(len(problems))]
    stats = {"parse_rate": sum(f is not None for f in formatted) / max(1, len(texts)),
             "ctx_self": sum(f is not None and c is None for f, c in zip(formatted, parsed)) / max(1, len(texts))}
    return contexts, prompt_ids, completions, stats


def hl_reward(task_rewards, ll_logprobs, mask, alpha):
    """R_HL = R_task + alpha * (1/|y|) sum_t log p_phi(y_t | x, c, y_<t): the confidence form of
    R_task - alpha * H(p_phi(. | x, c)), per LL answer, with the per-token MEAN log-prob (so long answers
    are not penalised for their length). task_rewards: (N,); ll_logprobs, mask: (N, T)."""
    mean_logp = (ll_logprobs * mask).sum(1) / mask.sum(1).clamp(min=1)
    return task_rewards + alpha * mean_logp


def hl_update(hl_model, sft_model, optimizer, hl_prompts, hl_completions, r_hl, cfg, group):
    """§5.2: advantages of R_HL over the `group` contexts of each problem, then the clipped surrogate on the
    context tokens plus beta_HL * k3 KL to the frozen pi_SFT (none when beta_HL = 0), at the HL's budget and
    temperature (never greedy: the contexts were sampled)."""
    adv = group_advantages(r_hl, group, cfg.scale_by_std)
    return grpo.policy_update(hl_model, sft_model if cfg.beta_hl else None, optimizer, hl_prompts, hl_completions,
                              adv, cfg, cfg.beta_hl, cfg.max_context_tokens, cfg.hl_temperature or 1.0)


def hl_step(hl_model, sft_model, ll_model, optimizer, tokenizer, batch, cfg, step, eos):
    """One HL update with the LL frozen: G contexts per x, M LL answers per context, R_HL averaged over
    the M answers, group advantages over the G contexts, clipped surrogate + beta_HL * k3 KL to pi_SFT
    on the context tokens."""
    G, M = cfg.hl_group, cfg.ll_answers
    t0 = time.time()
    # 1. G contexts per problem from pi_theta
    hl_temperature = cfg.hl_temperature or 1.0  # the update needs distinct contexts: never greedy here
    contexts, hl_prompts, hl_completions, ctx_stats = generate_contexts(
        hl_model, tokenizer, batch, G, cfg.max_context_tokens, hl_temperature, eos,
        seed=stream_seed(cfg.seed, "hl", step), self_threshold=cfg.self_threshold)
    contexts, dropped = grpo.fit_contexts(tokenizer, batch, contexts, cfg.max_prompt_tokens)  # the LL step's rule
    # 2. M answers of the frozen LL per context; y ~ p_phi(. | x, c), its per-token log-probs (no gradient)
    per_context = [encode(tokenizer, format_prompt(tokenizer, p["problem"], c))
                   for p, cs in zip(batch, contexts) for c in cs]                # (B*G)
    ll_prompts = [ids for ids in per_context for _ in range(M)]               # (B*G*M)
    answers, answer_logp = generate(ll_model, ll_prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, eos,
                                    seed=stream_seed(cfg.seed, "hl_ll", step))
    texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
    r_task, acc, boxed, _ = score(texts, [p["answer"] for p in batch for _ in range(G * M)], cfg.format_bonus)
    logp, mask = grpo.pad_completions(answer_logp, value=0.0)
    # 3. R_HL per answer, averaged over each context's M answers -> (B*G,)
    r_hl = hl_reward(r_task, logp, mask, cfg.alpha).view(-1, M).mean(1)
    # 4-5. group advantages over the G contexts, the update of pi_theta with the KL to the frozen pi_SFT
    stats = hl_update(hl_model, sft_model, optimizer, hl_prompts, hl_completions, r_hl, cfg, G)
    record = {"step": step + 1, "reward": r_hl.mean().item(), "acc": acc.mean().item(), "boxed": boxed.mean().item(),
              **ctx_stats, "ctx_len": sum(len(c) for c in hl_completions) / len(hl_completions), "ctx_dropped": dropped,
              **grpo.rollout_stats(answers, eos), "prompt_len": sum(map(len, per_context)) / len(per_context),
              "zero_var": grpo.zero_variance_fraction(r_hl, G),
              **stats, "peak_mem_gb": grpo.peak_memory_gb(), "time": time.time() - t0}
    roll = {"texts": [tokenizer.decode(hl_completions[0], skip_special_tokens=True)], "rewards": r_hl,
            "context": contexts[0][0]}
    return record, roll

# -----------------------------------------------------------------------------
# commands


@dataclass
class Config(grpo.Config):
    HIDDEN = ("beta", "group_size", "max_prompt_tokens")  # the LL's KL weight and group: beta_hl and hl_group here
    model: str = arg("smollm2", "HL model: smollm2, Qwen2.5-0.5B, a hub id, or a folder (an SFT'd HL)")
    out: str = arg("runs/hl", "run folder (sft: the SFT'd HL is saved in OUT/hl)")
    holdout: str = arg("", "JSONL of problems never used in D_SFT (default: math500.jsonl beside --data, if any)")
    max_context_tokens: int = arg(192, "HL budget per context (SFT targets longer than this are dropped)", ge=1)
    sft_steps: int = arg(60, "SFT steps", ge=1)
    sft_batch: int = arg(8, "SFT pairs per step", ge=1)
    sft_lr: float = arg(5e-5, "SFT learning rate", gt=0)
    sft_heldout: int = arg(32, "pairs held out for the printed SFT loss", ge=0)
    ll_model: str = arg("smollm2", "train: the frozen LL that answers with the HL's contexts")
    hl_group: int = arg(4, "G: contexts per problem in the HL update", ge=2)
    ll_answers: int = arg(2, "M: LL answers per context", ge=1)
    alpha: float = arg(0.1, "alpha: weight of the LL's mean token log-prob in R_HL (0 = task only)", ge=0)
    beta_hl: float = arg(0.04, "beta_HL: k3 KL to the frozen pi_SFT (0 = no SFT constraint)", ge=0)
    hl_temperature: float = arg(1.0, "HL sampling temperature (0 = greedy)", ge=0)
    self_threshold: float = arg(0.9, "leakage guard: an HL example whose problem has a bag-of-words cosine >= this "
                                     "with x (or the same normalised text) is no context (rule 1b)", gt=0, le=1)
    n_show: int = arg(4, "sample: contexts to print", ge=1)


def save_model(model, tokenizer, folder):
    """save_pretrained of the model and its tokenizer, by rank 0 (every rank waits for it under torchrun)."""
    if grpo.rank() == 0:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    grpo.barrier()


def find_holdout(cfg):
    """Problems to keep out of D_SFT: --holdout, else the test split of a built-in task (arith-test for
    --data arith), else math500.jsonl beside --data when it exists (alternate.py passes its --eval-data)."""
    if not cfg.holdout and cfg.data in grpo.HELDOUT:
        print(f"D_SFT excludes the problems of {grpo.HELDOUT[cfg.data]}")
        return grpo.load_problems(grpo.HELDOUT[cfg.data])
    path = cfg.holdout or (os.path.join(os.path.dirname(cfg.data), "math500.jsonl") if os.path.isfile(cfg.data) else "")
    if path and os.path.exists(path):
        print(f"D_SFT excludes the problems of {path}")
        return grpo.load_problems(path)
    print("D_SFT: no held-out file found (--holdout): no MATH-500 exclusion beyond the data itself")
    return []


def main(command, cfg):
    if command == "sample" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("torchrun: `hl_generator.py sample` only prints a few contexts: run it with python")
    problems = grpo.load_problems(cfg.data, cfg.limit or None, cfg.seed, sample=True)  # the data first: a bad file stops
    holdout = find_holdout(cfg) if command == "sft" else []
    device = grpo.init_distributed(grpo.pick_device(cfg.device))  # under torchrun: the process group, this rank's GPU
    if command == "train":
        grpo.check_divides(cfg.batch_problems)
    elif command == "sft":
        grpo.check_divides(cfg.sft_batch, "--sft-batch")
    out = grpo.start_run(cfg) if command != "sample" else cfg.out  # sample only prints: no run folder
    model, tokenizer = grpo.load_model(cfg.model, device=device, trainable=command != "sample",
                                       precision=cfg.precision, grad_ckpt=cfg.grad_ckpt)
    model.eval()
    eos = grpo.eos_token_ids(model, tokenizer)
    if command == "sft":
        pairs = build_sft_pairs(problems, holdout)
        print(f"D_SFT: {len(pairs)} pairs, e.g.\n  x : {pairs[0][0]['problem'][:120]!r}\n  x': {pairs[0][1][0][:120]!r}")
        sft(model, tokenizer, pairs, cfg, tokenizer.eos_token_id)
        save_model(model, tokenizer, os.path.join(out, "hl"))
        print(f"saved the SFT'd HL to {out}/hl")
    elif command == "sample":
        batch = problems[:cfg.n_show]
        contexts, _, completions, st = generate_contexts(model, tokenizer, batch, 1, cfg.max_context_tokens,
                                                         cfg.hl_temperature, eos, seed=stream_seed(cfg.seed, "hl", 0),
                                                         self_threshold=cfg.self_threshold)
        for p, c, text in zip(batch, contexts, tokenizer.batch_decode(completions, skip_special_tokens=True)):
            verdict = "parsed" if c[0] else "DOES NOT PARSE" if parse_context(text) is None else "RESTATES x: dropped"
            print(f"=== x: {p['problem'][:200]}\n--- HL output ({verdict}):\n{text}\n")
        print(f"parse rate {st['parse_rate']:.2f}, restated x {st['ctx_self']:.2f}, on {len(batch)} problems "
              f"(greedy: --hl-temperature 0)")
    elif command == "train":
        sft_model = grpo.frozen_copy(model)  # pi_SFT: the HL as it was loaded, frozen
        ll_model, _ = grpo.load_model(cfg.ll_model, device=device, flag="--ll-model", precision=cfg.precision)
        ll_model.eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
        step = grpo.load_checkpoint(out, {"hl": model}, {"hl": optimizer}) if cfg.resume else 0
        grpo.train_loop(cfg, out, step, problems,
                        lambda batch, t: hl_step(model, sft_model, ll_model, optimizer, tokenizer, batch, cfg, t, eos),
                        {"hl": model}, {"hl": optimizer}, tokenizer, name="hl step")
    else:
        raise SystemExit(f"unknown command {command!r}: sft, sample or train")


if __name__ == "__main__":
    usage = "usage: python hl_generator.py {sft,sample,train} [--flags]  (--help after the command lists the flags)"
    if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help"):
        print(__doc__ + "\n" + usage)
        sys.exit(0)
    if len(sys.argv) < 2 or sys.argv[1] not in ("sft", "sample", "train"):
        raise SystemExit(usage)
    main(sys.argv[1], grpo.parse_config(Config, sys.argv[2:]))
