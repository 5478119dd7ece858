"""
hl_generator.py: the higher level pi_theta(c | x) (README "The method", 4): D_SFT by TF-IDF
neighbours (also the retrieval baseline), the leakage guard, the HL's prompt and parser, SFT, R_HL
and the HL update. The rules it follows: README deviations.
"""

import itertools
import math
import re
import sys
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import torch

import grpo
from grpo import encode, format_context, generate, group_advantages, sequence_logprobs, stream_seed
from math_reward import context_quality_rates, extract_boxed

# --- 1. TF-IDF neighbours, the leakage guard, D_SFT -----------------------------------------------

_WORD = re.compile(r"\\[a-z]+|[a-z]+|\d+")  # TF-IDF terms: LaTeX commands, words, numbers
# restates(): the same, and every other symbol
_SYMBOL = re.compile(r"\\[a-z]+|[a-z]+|\d+|[^\sa-z\d\\]")
_LATEX_SPACE = re.compile(r"\\[,;:! ]|\\q?quad\b|~")


def normalize_text(text):  # lower case, no `$`, LaTeX spacing as a space, single spaces
    return " ".join(_LATEX_SPACE.sub(" ", text.lower()).replace("$", "").split())


def restates(text, problem, threshold=0.9):
    """The leakage guard: is `text` x itself? The same normalised text, or a symbol-count cosine >=
    threshold."""
    a, b = normalize_text(text), normalize_text(problem)
    ca, cb = Counter(_SYMBOL.findall(a)), Counter(_SYMBOL.findall(b))
    norm = math.sqrt(sum(n * n for n in ca.values()) * sum(n * n for n in cb.values()))
    return a == b or (norm > 0 and sum(n * cb[w] for w, n in ca.items()) / norm >= threshold)


def tfidf_vectors(texts, vocab=None):
    """L2-normalised TF-IDF rows (n, V): tf = count, idf = log((1 + n) / (1 + df)) + 1; `vocab`
    reuses a fitted one."""
    docs = [_WORD.findall(t.lower()) for t in texts]
    if vocab is None:
        df = Counter(w for d in docs for w in set(d))
        words = sorted(df)
        idf = [math.log((1 + len(docs)) / (1 + df[w])) + 1 for w in words]
        vocab = ({w: j for j, w in enumerate(words)}, np.array(idf, dtype=np.float32))
    index, idf = vocab
    X = np.zeros((len(docs), len(idf)), dtype=np.float32)
    for i, d in enumerate(docs):
        np.add.at(X[i], [index[w] for w in d if w in index], 1.0)
    X *= idf
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-8), vocab


def nearest_neighbours(queries, pool, k=1, exclude=None, self_threshold=0.9):
    """Per query, the pool indices of its k nearest problems by TF-IDF cosine: the same subject when
    it has one in the pool, never the query itself or a restatement of it, never a problem with
    exclude(p). -1 where none is left."""
    out, groups = np.full((len(queries), k), -1, dtype=np.int64), {}
    for j, p in enumerate(pool):
        if exclude is None or not exclude(p):
            groups.setdefault(p.get("subject", ""), []).append(j)
    by_subject = {}
    for i, q in enumerate(queries):
        subject = q.get("subject", "")
        by_subject.setdefault(subject if subject in groups else "", []).append(i)
    for subject, qi in by_subject.items():
        pj = groups.get(subject) or [j for js in groups.values() for j in js]
        P, vocab = tfidf_vectors([pool[j]["problem"] for j in pj])
        sims = tfidf_vectors([queries[i]["problem"] for i in qi], vocab)[0] @ P.T  # (queries, pool)
        # nearest first, lazily: the leakage guard runs until k are found
        for r, i in enumerate(qi):
            uid, x = queries[i].get("unique_id"), queries[i]["problem"]
            ok = (
                pj[c]
                for c in np.argsort(-sims[r], kind="stable")
                if (uid is None or pool[pj[c]].get("unique_id") != uid)
                and not restates(pool[pj[c]]["problem"], x, self_threshold)
            )
            for m, j in enumerate(itertools.islice(ok, k)):
                out[i, m] = j
    return out


def as_example(problem):
    """A training problem as a worked example (x', y'): its solution, else its boxed answer."""
    solution = problem.get("solution") or f"The answer is $\\boxed{{{problem['answer']}}}$."
    return problem["problem"], solution


def retrieve(queries, pool, self_threshold=0.9):
    """The retrieval baseline: per query its nearest pool problem as a worked example, or None."""
    nn = nearest_neighbours(queries, pool, 1, None, self_threshold)[:, 0]
    return [as_example(pool[j]) if j >= 0 else None for j in nn]


def holdout_filter(held):  # is a problem one of the held-out ones, by unique_id or by text?
    ids = {p.get("unique_id") for p in held} - {None}
    texts = {normalize_text(p["problem"]) for p in held}
    return lambda p: p.get("unique_id") in ids or normalize_text(p["problem"]) in texts


# no training on an evaluation problem (the same id or text): removed, counted
def drop_overlap(problems, held):
    is_held = holdout_filter(held)
    kept = [p for p in problems if not is_held(p)]
    removed = len(problems) - len(kept)
    print(f"training problems: {removed} of {len(problems)} removed as evaluation problems")
    return kept or sys.exit("every training problem is held out: pass disjoint --data, --eval-data")


def within_budget(tokenizer, pool, max_tokens):
    """The pool problems whose worked example and EOS fit the HL's budget, the rule of D_SFT's
    targets in sft; the others dropped, counted."""
    kept = []
    for p in pool:
        target = encode(tokenizer, format_context(as_example(p)), target=True)
        if len(target) + 1 <= max_tokens:  # + the EOS
            kept.append(p)
    dropped = len(pool) - len(kept)
    print(f"contexts without an HL: {dropped} of {len(pool)} examples over {max_tokens} tokens")
    return kept or sys.exit(f"no training example fits --max-context-tokens {max_tokens}: raise it")


def context_source(kind, pool, queries, seed, self_threshold=0.9):
    """contexts(batch, n, idx, purpose) -> n per problem: `retrieved`, the TF-IDF nearest pool
    problem (of the queries); `random`, seeded random pool problems (one that restates x: None)."""
    nearest = retrieve(queries, pool, self_threshold) if kind == "retrieved" else []
    lookup = {normalize_text(q["problem"]): c for q, c in zip(queries, nearest)}

    def contexts(batch, n, idx, purpose):
        if kind == "retrieved":
            return [[lookup.get(normalize_text(p["problem"]))] * n for p in batch]
        if kind != "random":
            return [[None] * n for _ in batch]
        rng = np.random.default_rng(grpo.stream_seed(seed, purpose, idx))
        out = []
        for p in batch:
            drawn = [pool[j] for j in rng.integers(0, len(pool), size=n)]
            restated = [restates(q["problem"], p["problem"], self_threshold) for q in drawn]
            out.append([None if r else as_example(q) for q, r in zip(drawn, restated)])
        return out

    return contexts


def build_sft_pairs(train_problems, holdout_problems=(), self_threshold=0.9):
    """D_SFT: [(x, (x', y'))], x' the nearest neighbour of x, never x itself, never a held-out
    problem (as x or x')."""
    held = holdout_filter(holdout_problems)
    train = [p for p in train_problems if not held(p)]
    nearest = nearest_neighbours(train, train, 1, held, self_threshold)[:, 0]
    return [(x, as_example(train[j])) for x, j in zip(train, nearest) if j >= 0]


# --- 2. the HL's prompt and its parser ------------------------------------------------------------

HL_INSTRUCTION = (
    "Write ONE worked example that would help a student solve the problem below: a related but "
    "different problem, and its step-by-step solution ending with the final answer in \\boxed{}. "
    "Use exactly this format:\nProblem: <the related problem>\nSolution: <its solution>"
)
_PROBLEM = re.compile(r"problem\s*\**\s*:", re.IGNORECASE)
_SOLUTION = re.compile(r"solution\s*\**\s*:", re.IGNORECASE)


def hl_prompt(tokenizer, problem):
    return grpo.as_chat(tokenizer, HL_INSTRUCTION + "\n\nThe problem:\n" + problem.strip(), "\n\n")


def parse_context(text, problem=None, self_threshold=0.9):
    """(x', y') from "Problem: ... Solution: ... \\boxed{...}", else None (rule 1); None too when x'
    restates `problem` (rule 1b)."""
    p = _PROBLEM.search(text or "")
    s = _SOLUTION.search(text, p.end()) if p else None
    if s is None:
        return None
    example = text[p.end() : s.start()].strip(" *\n\t")
    solution = text[s.end() :].strip(" *\n\t")
    if not example or not solution or extract_boxed(solution) is None:
        return None
    if problem is not None and restates(example, problem, self_threshold):
        return None
    return example, solution


# --- 3. SFT: theta_0 ------------------------------------------------------------------------------


def sft_loss(model, prompt_ids, target_ids, n_tokens=None):
    """The mean NLL of the target tokens given the prompt (the prompt is not in the completion
    mask)."""
    logp, mask = sequence_logprobs(model, prompt_ids, target_ids)
    return -(logp * mask).sum() / (mask.sum() if n_tokens is None else n_tokens)


def sft_step(model, optimizer, prompt_ids, target_ids):
    """One SFT update: the mean NLL over the batch's target tokens (under torchrun each rank its
    share)."""
    n_tokens = sum(map(len, target_ids)) / grpo.world_size()  # this rank's share of the mean
    loss = sft_loss(model, grpo.my_share(prompt_ids), grpo.my_share(target_ids), n_tokens)
    loss.backward()
    grpo.average_gradients(model)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grpo.reduce_record({"loss": loss.item()})["loss"]


def sft_order(n, n_held, batch, steps, seed):
    """A seeded permutation of D_SFT, the first n_held held out; step t's batch by
    grpo.batch_indices over the rest."""
    # the same on every rank
    perm = np.random.default_rng([seed, grpo.PURPOSES.index("sft")]).permutation(n).tolist()
    held, rest = perm[:n_held], perm[n_held:]
    return held, [
        [rest[i] for i in grpo.batch_indices(len(rest), batch, t, seed)] for t in range(steps)
    ]


@torch.no_grad()
def heldout_loss(model, prompts, targets, held):
    """The mean SFT loss of the held-out pairs, 8 at a time (NaN when none is held out)."""
    if not held:
        return float("nan")
    total = 0.0
    for s in range(0, len(held), 8):
        rows = held[s : s + 8]
        loss = sft_loss(model, [prompts[i] for i in rows], [targets[i] for i in rows])
        total += loss.item() * len(rows)
    return total / len(held)


def sft(model, tokenizer, pairs, cfg, eos_id, log=print):
    """theta_0: SFT of the HL on D_SFT (targets "Problem: x'\\nSolution: y'" + EOS within
    --max-context-tokens; a longer one is dropped, counted), cfg.sft_batch pairs per step; the
    held-out loss before and after. Returns the share of D_SFT dropped."""
    data = []
    for i, (x, c) in enumerate(pairs):
        target = encode(tokenizer, format_context(c), target=True) + [eos_id]
        if len(target) <= cfg.max_context_tokens:
            data.append((i, encode(tokenizer, hl_prompt(tokenizer, x["problem"])), target))
    log(
        f"SFT: {len(pairs) - len(data)} of {len(pairs)} pairs dropped: "
        f"target > {cfg.max_context_tokens} tokens"
    )
    if len(data) < 2:
        raise SystemExit(
            f"SFT: {len(data)} D_SFT pairs fit --max-context-tokens "
            f"{cfg.max_context_tokens}: raise it"
        )
    kept, prompts, targets = map(list, zip(*data))
    held, batches = sft_order(
        len(kept), min(cfg.sft_heldout, len(kept) // 5), cfg.sft_batch, cfg.sft_steps, cfg.seed
    )

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)

    log(
        f"SFT: {len(kept) - len(held)} train pairs, {len(held)} held out; "
        f"held-out loss before {heldout_loss(model, prompts, targets, held):.3f}"
    )
    model.train()
    t0 = time.time()
    for step, b in enumerate(batches):
        loss = sft_step(model, opt, [prompts[i] for i in b], [targets[i] for i in b])
        if (step + 1) % max(1, cfg.sft_steps // 10) == 0 or step == cfg.sft_steps - 1:
            left = (time.time() - t0) / (step + 1) * (cfg.sft_steps - step - 1)
            log(f"SFT step {step + 1}/{cfg.sft_steps} | loss {loss:.3f} | ~{left:.0f}s left")
    model.eval()
    log(f"SFT: held-out loss after {heldout_loss(model, prompts, targets, held):.3f}")
    return 1 - len(data) / len(pairs)  # the share of D_SFT dropped


# --- 4. contexts from the HL, R_HL, the HL update -------------------------------------------------


@torch.no_grad()
def generate_contexts(
    hl_model, tokenizer, problems, n, max_tokens, temperature, eos, seed=None, self_threshold=0.9
):
    """n contexts per problem from pi_theta, each parsed (x', y') or None (rules 1, 1b); the HL
    prompts and completions; parse_rate (outputs in the format) and ctx_self (those that restated
    x)."""
    xs = [p["problem"] for p in problems for _ in range(n)]
    prompt_ids = [encode(tokenizer, hl_prompt(tokenizer, x)) for x in xs]
    completions, _ = generate(hl_model, prompt_ids, max_tokens, temperature, eos, seed=seed)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    formatted = [parse_context(t) for t in texts]
    parsed = [parse_context(t, x, self_threshold) for t, x in zip(texts, xs)]
    restated = [f is not None and c is None for f, c in zip(formatted, parsed)]
    n_texts = max(1, len(texts))
    stats = {
        "parse_rate": sum(f is not None for f in formatted) / n_texts,
        "ctx_self": sum(restated) / n_texts,
    }
    contexts = [parsed[i * n : (i + 1) * n] for i in range(len(problems))]
    return contexts, prompt_ids, completions, stats


def hl_contexts(hl, tokenizer, batch, n, cfg, eos, purpose, idx):
    """n sampled contexts per problem (never greedy: G rollouts or G_HL contexts need their own):
    generate_contexts."""
    temperature = cfg.hl_temperature or 1.0
    seed = stream_seed(cfg.seed, purpose, idx)
    return generate_contexts(
        hl, tokenizer, batch, n, cfg.max_context_tokens, temperature, eos, seed, cfg.self_threshold
    )


def hl_reward(task_rewards, ll_logprobs, mask, alpha):
    """R_HL = R_task + alpha * (1/|y|) sum_t log p_phi(y_t | x, c, y_<t) per LL answer: the
    confidence form of R_task - alpha * H. task_rewards: (N,); ll_logprobs, mask: (N, T)."""
    confidence = (ll_logprobs * mask).sum(1) / mask.sum(1).clamp(min=1)  # (N,) mean token log-prob
    return task_rewards + alpha * confidence


def hl_update(hl_model, sft_model, optimizer, hl_prompts, hl_completions, r_hl, cfg, group):
    """The HL objective: advantages of R_HL over each problem's `group` contexts; the clipped
    surrogate on the context tokens + beta_HL k3 KL to pi_SFT."""
    adv = group_advantages(r_hl, group, cfg.scale_by_std)
    anchor = sft_model if cfg.beta_hl else None
    return grpo.policy_update(
        hl_model,
        anchor,
        optimizer,
        hl_prompts,
        hl_completions,
        adv,
        cfg,
        beta=cfg.beta_hl,
        max_len=cfg.max_context_tokens,
        temperature=cfg.hl_temperature or 1.0,
    )


def hl_step(hl_model, sft_model, ll_model, optimizer, tokenizer, batch, cfg, step, eos):
    """One HL update with the LL frozen: G_HL contexts per x, M LL answers per context, R_HL
    averaged over each context's M answers."""
    t0 = time.time()
    G = cfg.hl_group
    M = cfg.ll_answers
    contexts, hl_prompts, hl_completions, ctx_stats = hl_contexts(
        hl_model, tokenizer, batch, G, cfg, eos, "hl", step
    )
    repeated = [[c for c in cs for _ in range(M)] for cs in contexts]  # M answers per context
    seed = stream_seed(cfg.seed, "hl_ll", step)
    ll_cfg = cfg
    if cfg.hl_ll_temperature >= 0:  # the LL's answers in the HL step at their own temperature
        ll_cfg = replace(cfg, temperature=cfg.hl_ll_temperature)
    roll = grpo.rollouts(ll_model, tokenizer, batch, repeated, ll_cfg, eos, seed)
    ll_logp, mask = grpo.pad_completions(roll.sampler_logp, value=0.0)  # (B*G*M, T)
    r_hl_answers = hl_reward(roll.r_task, ll_logp, mask, cfg.alpha)  # (B*G*M,)
    r_hl = r_hl_answers.view(-1, M).mean(1)  # (B*G,): the mean over each context's M answers
    stats = hl_update(hl_model, sft_model, optimizer, hl_prompts, hl_completions, r_hl, cfg, G)
    record = grpo.step_record(roll, r_hl, stats, G, eos, t0)
    record.update(
        ctx_stats,
        **context_quality_rates(batch, contexts),
        ctx_len=sum(map(len, hl_completions)) / len(hl_completions),
        reward_spread=r_hl.view(-1, G).std(1, unbiased=False).mean().item(),  # within a group
    )
    return record
