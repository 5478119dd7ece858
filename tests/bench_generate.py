"""
Benchmark: our sampler (grpo.generate) against transformers' model.generate, same model, same prompts,
same settings, measured side by side in one run. Prints tokens/s of both, ms per decode step and the ratio.

    python tests/bench_generate.py                   # CPU: embedded SmolLM2-135M, small sizes
    python tests/bench_generate.py --examples 3      # CPU: the GRPO shape with 3 worked examples per prompt
    python tests/bench_generate.py --device cuda     # GPU: random Qwen2.5-0.5B, 64 and 256 rows x 1,024 tokens,
                                                     #      and the GRPO shape (8 problems x G = 8, 384-token prompts)

Workloads:
    fixed:  R distinct prompts, exactly N new tokens each (EOS ignored by both: ours gets no EOS id,
            model.generate gets min_new_tokens = N), sampling at T = 1.
    grpo:   the GRPO shape: P problems x G = 8 samples. With a real model each prompt is a MATH problem with K
            (default 1) random training problems and their solutions as context, stopping at EOS; with a
            random model (--config) each prompt is --prompt-tokens long and the length is fixed. model.generate
            gets the prompts repeated G times, as GRPO trainers call it; ours prefills each distinct prompt once.
Both run at the same --precision (auto: bf16 on a GPU: fp32 weights under one bf16 autocast region, the
training path of the policy; fp32 on a CPU).
"""
import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import grpo  # noqa: E402

TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "math_train.jsonl")
CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models", "qwen2.5-0.5b-config.json")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def hf_generate(model, prompt_ids, max_new_tokens, eos, pad_id, fixed):
    ids, mask, _ = grpo._left_pad(prompt_ids, model.device)
    ids[mask == 0] = pad_id
    kw = dict(min_new_tokens=max_new_tokens) if fixed else {}
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad_id, **kw)
    new = out[:, ids.shape[1]:].tolist()
    # tokens actually generated: up to and including the first EOS
    return sum(next((k + 1 for k, t in enumerate(r) if t in eos), len(r)) for r in new)


def bench(name, model, prompt_ids, max_new_tokens, eos, pad_id, fixed, device, repeats):
    rows = []
    for r in range(repeats):  # alternate the two, so drift in machine speed hits both alike
        (toks, _), t_ours = timed(lambda: grpo.generate(model, prompt_ids, max_new_tokens, 1.0,
                                                         [] if fixed else eos, seed=r), device)
        n_ours = sum(len(t) for t in toks)
        with grpo._autocast(model):  # the same arithmetic as ours, in one region too
            n_hf, t_hf = timed(lambda: hf_generate(model, prompt_ids, max_new_tokens, eos, pad_id, fixed), device)
        rows.append((n_ours / t_ours, n_hf / t_hf, t_ours, t_hf))
    ours = sum(r[0] for r in rows) / len(rows)
    hf = sum(r[1] for r in rows) / len(rows)
    ms = lambda t: 1000 * t / max_new_tokens  # noqa: E731  (per decode step, prefill included, at a fixed length)
    print(f"{name:40} ours {ours:9.1f} tok/s ({rows[-1][2]:.2f} s, {ms(rows[-1][2]):.1f} ms/step)  model.generate "
          f"{hf:9.1f} tok/s ({rows[-1][3]:.2f} s, {ms(rows[-1][3]):.1f} ms/step)  ratio {ours / hf:5.2f}x", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="model name or folder (ignored with --config)")
    ap.add_argument("--tokenizer", default="", help="with --config: a tokenizer folder for the prompts' text "
                                                     "(default: the embedded SmolLM2's)")
    ap.add_argument("--config", default=None, help="a config.json: random-initialised model (default on a GPU: "
                                                    "../shared/models/qwen2.5-0.5b-config.json)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--rows", type=int, nargs="+", default=None, help="rows of the fixed workload (CPU 8; GPU 64 256)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (CPU 64; GPU 1024)")
    ap.add_argument("--problems", type=int, default=None, help="problems in the GRPO workload, x G = 8 (CPU 2; GPU 8)")
    ap.add_argument("--examples", type=int, default=1, help="worked examples in each GRPO prompt's context")
    ap.add_argument("--prompt-tokens", type=int, default=384, help="GRPO prompt length with a random model")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per workload (averaged)")
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    args.config = CONFIG if args.config is None and gpu else args.config
    args.rows = args.rows or ([64, 256] if gpu else [8])
    args.new_tokens = args.new_tokens or (1024 if gpu else 64)
    args.problems = args.problems or (8 if gpu else 2)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and gpu)
    if args.config:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        cfg = json.load(open(args.config))
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).to(args.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or grpo.resolve_model("smollm2"))  # prompt ids only
        vocab = model.config.vocab_size
        encode = lambda text: [t % vocab for t in grpo.encode(tokenizer, text)]  # noqa: E731
        eos = [model.config.eos_token_id]
    else:
        model, tokenizer = grpo.load_model(args.model, device=args.device, trainable=True, precision=args.precision)
        model.eval()
        encode = lambda text: grpo.encode(tokenizer, text)  # noqa: E731
        eos = grpo.eos_token_ids(model, tokenizer)
    model.compute_dtype = torch.bfloat16 if bf16 else torch.float32  # fp32 weights: the policy's training path
    problems = grpo.load_problems(TRAIN, limit=400) if os.path.exists(TRAIN) else grpo.ops_problems(400)
    name = args.config or args.model
    print(f"model {name} on {args.device} ({torch.cuda.get_device_name() if gpu else 'CPU'}, "
          f"{torch.get_num_threads()} threads), {'bf16 autocast' if bf16 else 'fp32'}, {args.new_tokens} new tokens, T = 1")
    for rows in args.rows:
        prompts = [encode(grpo.format_prompt(tokenizer, p["problem"])) for p in problems[:rows]]
        lens = [len(p) for p in prompts]
        bench(f"fixed: {rows} rows, prompts {min(lens)}-{max(lens)} tok", model, prompts, args.new_tokens, eos,
              0, True, args.device, args.repeats)
    if args.config:  # a random model: fixed-length prompts and completions
        rng = random.Random(0)
        ctx = [[rng.randrange(100, 10000) for _ in range(args.prompt_tokens)] for _ in range(args.problems)]
        bench(f"grpo: {args.problems} x 8, prompts {args.prompt_tokens} tok", model, [p for p in ctx for _ in range(8)],
              args.new_tokens, eos, 0, True, args.device, args.repeats)
        return
    K = args.examples
    drawn = random.Random(0).sample(problems, (1 + K) * args.problems)  # a problem, then its K examples
    ctx = []
    for i in range(args.problems):
        examples = drawn[args.problems + K * i: args.problems + K * (i + 1)]
        context = "\n\n".join(grpo.format_context((c["problem"], c.get("solution", ""))) for c in examples)
        ctx.append(encode(grpo.format_prompt(tokenizer, drawn[i]["problem"], context)))
    lens = [len(p) for p in ctx]
    rows = [p for p in ctx for _ in range(8)]
    bench(f"grpo: {args.problems} x 8, {K} ex., prompts {min(lens)}-{max(lens)} tok", model, rows, args.new_tokens,
          eos, 0, False, args.device, args.repeats)


if __name__ == "__main__":
    main()
