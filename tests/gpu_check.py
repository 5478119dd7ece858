"""
The GPU check, prepared on a CPU and run once when a GPU is lent. On a randomly initialised Qwen2.5-0.5B of the
real config (its 151,936-token vocabulary; random weights never stop, so every length is fixed):
  (a) correctness: our greedy tokens = model.generate's (fp32 and bf16); the sampler's log-probs = a forward pass;
      a bf16 policy equal to its frozen copy has a KL of exactly 0;
  (b) speed: our sampler against model.generate at 64 and 256 rows x 1,024 new tokens and at the GRPO shape
      (8 problems x 8 rollouts, 384-token prompts, 512 new tokens), and its static cache (not compiled; not at 256);
  (c) memory: the peak of one LL and one HL update of experiment 5 (micro-batch 8; rows of 1,536 and 1,024
      tokens, as in the README's table), with and without --grad-ckpt;
  (d) one round of experiment 5 (alternate.py, G = 8, 512 new tokens, 384 context tokens, 64 evaluation
      problems): seconds per SFT step, LL step, HL step and evaluation.
It prints one table with the device's name and writes it, section by section, to $OUT/gpu_check.json.

    python tests/gpu_check.py --prepare .gpu_assets          # here, once: the config, a tokenizer, the MATH files
    python tests/gpu_check.py --assets .gpu_assets           # on the GPU machine (carry .gpu_assets): < 8 min
    python tests/gpu_check.py --assets .gpu_assets --toy     # any CPU, toy sizes: what tests/test_gpu_check.py runs
Sections can run apart (--only abc, then --only d) when one command would pass the device's time limit.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import grpo  # noqa: E402
from bench_generate import sync  # noqa: E402  (tests/ is this script's own folder, first on sys.path)
from bench_memory import off  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared")
README_PEAKS = {("LL", 1536, False): 37.00, ("LL", 1536, True): 20.51, ("HL", 1024, False): 30.88,  # "Memory of the
                ("HL", 1024, True): 19.89}                                                   # one-GPU path", mb 8
TOY = dict(num_hidden_layers=2, max_window_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
           num_key_value_heads=2)


def prepare(folder):
    """Copy what the check reads into one folder (git-ignored): ../shared is not on the GPU machine."""
    from transformers import AutoTokenizer
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(SHARED, "models", "qwen2.5-0.5b-config.json"), os.path.join(folder, "config.json"))
    for name in ("math_train.jsonl", "math500.jsonl"):
        shutil.copy(os.path.join(SHARED, "data", name), os.path.join(folder, name))
    AutoTokenizer.from_pretrained(grpo.resolve_model("smollm2")).save_pretrained(os.path.join(folder, "tokenizer"))
    print(f"wrote {folder}: carry it to the GPU machine")


def build(assets, toy, device, seed=0):
    """A random Qwen2.5-0.5B (toy: 2 small layers, the same vocabulary), fp32 weights computing in bf16 on a GPU
    (how load_model leaves a trained model), on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = json.load(open(os.path.join(assets, "config.json")))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**cfg, **(TOY if toy else {})})).to(device)
    model.compute_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return model.eval()


def hf_generate(model, prompts, n_new, greedy, static=False):
    """model.generate on left-padded prompts, exactly n_new new tokens; returns the new tokens per row."""
    ids, mask, _ = grpo._left_pad(prompts, model.device)
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    with grpo._autocast(model):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                             pad_token_id=0, **kw,
                             **(dict(cache_implementation="static", disable_compile=True) if static else {}))
    return out[:, ids.shape[1]:].tolist()


def check_correctness(model, prompts, n_new):
    """(a): greedy tokens against model.generate's, sampler log-probs against a forward pass, KL to a copy."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model.compute_dtype = dtype
        ours = grpo.generate(model, prompts, n_new, temperature=0.0, eos_token_ids=[])[0]
        theirs = hf_generate(model, prompts, n_new, greedy=True)
        first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), n_new) for x, y in zip(ours, theirs)]
        out[f"greedy_rows_equal_{name}"] = f"{sum(f == n_new for f in first)}/{len(first)}"
        out[f"greedy_first_difference_{name}"] = min(first)
    model.compute_dtype = torch.bfloat16 if model.device.type == "cuda" else torch.float32
    with torch.no_grad():
        tokens, sampler_logp = grpo.generate(model, prompts, n_new, temperature=1.0, eos_token_ids=[], seed=0)
        logp, mask = grpo.sequence_logprobs(model, prompts, tokens)
        diff = (logp - grpo.pad_completions(sampler_logp, model.device, value=0.0)[0]).abs() * mask
        ref_logp, _ = grpo.sequence_logprobs(grpo.frozen_copy(model), prompts, tokens)
        kl = grpo.masked_mean(grpo.k3_kl(logp, ref_logp), mask)
    out.update(logprob_max_abs_diff=diff.max().item(), logprob_mean_abs_diff=(diff.sum() / mask.sum()).item(),
               kl_policy_vs_its_copy=kl.item())
    return out


def time_sampler(model, name, prompts, n_new, static):
    """(b): tokens/s of our sampler, model.generate and (if it runs) its static cache, on the same prompts."""
    dev, row = str(model.device), {"workload": name}
    runs = [("ours", lambda: grpo.generate(model, prompts, n_new, 1.0, eos_token_ids=[], seed=0)),
            ("generate", lambda: hf_generate(model, prompts, n_new, greedy=False))]
    if static:
        runs.append(("generate_static", lambda: hf_generate(model, prompts, n_new, greedy=False, static=True)))
    for key, fn in runs:
        try:
            sync(dev)
            t = time.perf_counter()
            fn()
            sync(dev)
            row[f"{key}_tok_s"] = len(prompts) * n_new / (time.perf_counter() - t)
        except Exception as e:  # the static cache may not run with this transformers: say why, go on
            row[f"{key}_tok_s"] = f"{type(e).__name__}: {str(e)[:80]}"
    for key in ("generate", "generate_static"):
        if isinstance(row.get(f"{key}_tok_s"), float):
            row[f"ours_vs_{key}"] = row["ours_tok_s"] / row[f"{key}_tok_s"]
    return row


def update_peaks(ll, hl, sizes):
    """(c): the peak memory of one LL and one HL update (every model of experiment 5 in memory), micro-batch 8."""
    from types import SimpleNamespace
    ref, sft = grpo.frozen_copy(ll), grpo.frozen_copy(hl)
    rows, dev = [], str(ll.device)
    for name, model, frozen, tokens, new in (("LL", ll, ref, *sizes["ll"]), ("HL", hl, sft, *sizes["hl"])):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-9)
        for ckpt in (False, True):
            model.train()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}) if ckpt else off(model)
            cfg = SimpleNamespace(micro_batch=8, updates=1, clip_eps=0.2, loss_norm="seq", grad_clip=1.0)
            prompt, comp = [[1] * (tokens - new)] * 16, [[2] * new] * 16
            if dev.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                grpo.policy_update(model, frozen, opt, prompt, comp, torch.randn(16), cfg, 0.04, new, 1.0)
                peak = round(grpo.peak_memory_gb(), 2)
            except torch.OutOfMemoryError:
                peak = "out of memory"
            rows.append({"update": name, "rows x tokens": f"16 x {tokens} (micro-batch 8)", "grad_ckpt": ckpt,
                         "peak_gib": peak, "readme_cpu_estimate_gib": README_PEAKS.get((name, tokens, ckpt))})
        model.eval()
    return rows


def one_round(assets, toy, device, work):
    """(d): alternate.py experiment 5, one round, in this process, on the random model saved to `work`."""
    import alternate
    import hl_generator
    model = build(assets, toy, "cpu")
    model.save_pretrained(os.path.join(work, "model"))
    shutil.copytree(os.path.join(assets, "tokenizer"), os.path.join(work, "model"), dirs_exist_ok=True)
    sft_times, real_step = [], hl_generator.sft_step
    if device == "cuda":  # this section's own peak, not (c)'s
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def timed_step(*a):
        sync(device)
        t = time.perf_counter()
        loss = real_step(*a)
        sync(device)
        sft_times.append(time.perf_counter() - t)
        return loss

    hl_generator.sft_step = timed_step
    budget = (["--limit", "300", "--group-size", "2", "--max-new-tokens", "8", "--max-context-tokens", "384",
               "--eval-limit", "4", "--sft-batch", "2"] if toy else
              ["--limit", "3000", "--group-size", "8", "--max-new-tokens", "512", "--max-context-tokens", "384",
               "--eval-limit", "64"])  # --limit: the D_SFT build is not what is timed
    flags = ["--rounds", "1", "--ll-steps", "1", "--hl-steps", "1", "--sft-steps", "3"] + budget
    argv = ["--model", os.path.join(work, "model"), "--data", os.path.join(assets, "math_train.jsonl"), "--eval-data",
            os.path.join(assets, "math500.jsonl"), "--device", device, "--out", os.path.join(work, "run")] + flags
    try:
        alternate.main(grpo.parse_config(alternate.Config, argv))
    finally:
        hl_generator.sft_step = real_step
    metrics = grpo.read_jsonl(os.path.join(work, "run", "metrics.jsonl"))
    pick = lambda phase, key: [r[f"{phase}/{key}"] for r in metrics if r["phase"] == phase]  # noqa: E731
    return {"flags": " ".join(flags), "sft_step_s": sum(sft_times) / len(sft_times), "ll_step_s": pick("ll", "time")[0],
            "hl_step_s": pick("hl", "time")[0], "eval_s": pick("eval", "seconds"), "eval_problems": pick("eval", "n")[0],
            "peak_gib": max(pick("ll", "peak_mem_gb") + pick("hl", "peak_mem_gb"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepare", metavar="DIR", help="write the assets folder (here, where ../shared is)")
    ap.add_argument("--assets", default=".gpu_assets", help="the folder --prepare wrote")
    ap.add_argument("--toy", action="store_true", help="toy sizes (a CPU, the test suite)")
    ap.add_argument("--only", default="abcd", help="the sections to run, e.g. ab")
    args = ap.parse_args()
    if args.prepare:
        return prepare(args.prepare)
    if not os.path.exists(os.path.join(args.assets, "config.json")):
        raise SystemExit(f"--assets {args.assets}: no config.json there; run --prepare {args.assets} where ../shared is")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out_dir = os.environ.get("OUT") or "gpu_check_out"
    os.makedirs(out_dir, exist_ok=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    result = {"device": name, "torch": torch.__version__, "toy": args.toy}
    import transformers
    result["transformers"] = transformers.__version__

    def save(key, value):
        result[key] = value
        result.setdefault("seconds", {})[key] = round(time.time() - t_start, 1)  # since the start, at its end
        grpo.write_json(os.path.join(out_dir, "gpu_check.json"), result)
        print(f"{key}: {json.dumps(value, default=str)}", flush=True)

    t_start = time.time()
    g = torch.Generator().manual_seed(0)
    rand = lambda n, length: [torch.randint(100, 30000, (length,), generator=g).tolist() for _ in range(n)]  # noqa
    model = build(args.assets, args.toy, device) if set(args.only) & set("abc") else None
    if "a" in args.only:
        save("a_correctness", check_correctness(model, [p[:40 + 8 * i] for i, p in enumerate(rand(4, 64))],
                                                16 if args.toy else 64))
    if "b" in args.only:
        shapes = ([(4, 16, 16), (8, 16, 16), (2, 16, 8)] if args.toy else [(64, 128, 1024), (256, 128, 1024),
                                                                          (8, 384, 512)])
        rows = []
        for k, (n, length, new) in enumerate(shapes):
            grpo_shape = k == len(shapes) - 1  # G = 8 copies of each prompt, as GRPO samples them
            prompts = [p for p in rand(n, length) for _ in range(8)] if grpo_shape else rand(n, length)
            label = f"grpo: {n} x 8, {length}-token prompts, {new} new" if grpo_shape else f"{n} rows x {new} new"
            rows.append(time_sampler(model, label, prompts, new, static=k != 1))  # not at 256 rows: time
        save("b_speed", rows)
    if "c" in args.only:
        save("c_memory", update_peaks(model, build(args.assets, args.toy, device, seed=1),
                                      {"ll": (64, 16), "hl": (48, 8)} if args.toy else
                                      {"ll": (1536, 512), "hl": (1024, 384)}))
    del model
    if "d" in args.only:
        with tempfile.TemporaryDirectory() as work:
            save("d_round", one_round(args.assets, args.toy, device, work))
    print(f"\n## GPU check on {name} (torch {result['torch']}, transformers {result['transformers']}"
          f"{', toy sizes' if args.toy else ''}): `python tests/gpu_check.py --assets {args.assets}`\n")
    for key in ("a_correctness", "b_speed", "c_memory", "d_round"):
        for row in (result.get(key) or []) if isinstance(result.get(key), list) else [result.get(key) or {}]:
            if row:
                print(f"| {key[0]} | " + " | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in row.items()) + " |")
    print(f"| seconds since the start, at the end of each section | {result['seconds']} |")
    print(f"\nwrote {out_dir}/gpu_check.json")


if __name__ == "__main__":
    main()
