"""
Benchmark: the memory of experiment 5 on Qwen2.5-0.5B (G = 8, 512 new tokens, 384 context tokens), measured.

    python tests/bench_memory.py                  # CPU: 1- and 2-layer random Qwen2.5-0.5B, bf16 path, extrapolated
    python tests/bench_memory.py --device cuda    # GPU: the real 24-layer shape, torch.cuda.max_memory_allocated

Both run the project's own code (grpo.sequence_logprobs, grpo.policy_update, grpo.generate) under --precision bf16
(fp32 weights, bf16 autocast; frozen copies run the same path, so they are fp32 too), with and without --grad-ckpt.

CPU: saved-tensor hooks count the bytes autograd holds for backward (distinct storages) in the training forward
of one row, for 1 and 2 decoder layers and two lengths (with a 4,096-token vocabulary, to be quick on a CPU:
what is held per token does not depend on it, since the projection is recomputed chunk by chunk in backward): the slope is the bytes per token per layer, the rest
the part outside the layers. The peak of a step is then: the static bytes of the models in memory (counted from
the 24-layer model's parameters: trained = fp32 weights + AdamW moments, + fp32 gradients for the model being
updated; frozen = fp32 weights), the bf16 casts autocast keeps of the updated model's weights, the activations
of one micro-batch (extrapolated to 24 layers), and one fp32 logits chunk of the vocabulary projection.
GPU: the same models are built at full size on the device and torch.cuda.max_memory_allocated is read around one
LL update, one HL update and one sampling call, at the same budgets.
"""
import argparse
import json
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import grpo  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models", "qwen2.5-0.5b-config.json")
GiB = 2 ** 30


def build(config, layers, device, seed=0, vocab=None):
    """A random model of the config with `layers` decoder layers (and `vocab` tokens if given), as
    load_model(trainable=True, precision=bf16) leaves it: fp32 weights, bf16 compute."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = json.load(open(config))
    small = {"vocab_size": vocab, "bos_token_id": None, "eos_token_id": None} if vocab else {}
    cfg = AutoConfig.for_model(**{**cfg, "num_hidden_layers": layers, **small})
    model = AutoModelForCausalLM.from_config(cfg).to(device)
    model.compute_dtype = torch.bfloat16
    return model


def saved_bytes(model, rows, tokens, ckpt):
    """Bytes autograd keeps for backward in one training forward (distinct storages), rows x tokens."""
    model.train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seen = {}

    def pack(t):
        if t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    prompt = [[1] * 16] * rows
    comp = [[2] * (tokens - 16)] * rows
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, mask = grpo.sequence_logprobs(model, prompt, comp)
    (lp * mask).sum().backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def cpu(args):
    with torch.device("meta"):  # shapes only
        full = build(args.config, 24, "meta")
    n, vocab = sum(p.numel() for p in full.parameters()), full.config.vocab_size
    print(f"{args.config}: {n / 1e6:.1f}M parameters (24 layers); measured on a CPU with 1 and 2 layers, "
          f"one row of {args.probe[0]} and {args.probe[1]} tokens")
    rates = {}
    for ckpt in (False, True):
        m = {(L, T): saved_bytes(build(args.config, L, "cpu", vocab=4096), 1, T, ckpt) for L in (1, 2)
             for T in args.probe}
        T0, T1 = args.probe
        layer = ((m[2, T1] - m[1, T1]) - (m[2, T0] - m[1, T0])) / (T1 - T0)   # per token per layer
        layer_const = (m[2, T0] - m[1, T0]) - layer * T0                      # per layer, e.g. bf16 weight casts
        outside = (m[1, T1] - m[1, T0]) / (T1 - T0) - layer                   # per token, outside the layers
        rates[ckpt] = (layer, layer_const, outside)
        print(f"  {'with' if ckpt else 'without'} --grad-ckpt: {layer / 1024:.1f} KiB per token per layer held for "
              f"backward, {outside / 1024:.1f} KiB per token outside the layers, {layer_const / 2**20:.1f} MiB per "
              f"layer independent of tokens")
    trained, frozen = n * (4 + 8), n * 4  # fp32 weights + AdamW m, v; frozen fp32 weights
    grads, casts, logits = n * 4, n * 2, 1024 * vocab * 4 * 2  # the updated model's; a 1,024-token fp32 chunk x 2
    print(f"\nexperiment 5 with Qwen2.5-0.5B, peak of one update (GiB): static = LL + HL + p_ref (= q) + pi_SFT "
          f"{(2 * trained + 2 * frozen) / GiB:.2f}, + gradients {grads / GiB:.2f}, + bf16 weight casts {casts / GiB:.2f}, "
          f"+ one logits chunk {logits / GiB:.2f}, + activations:")
    print("| update | micro-batch x tokens | --grad-ckpt | activations | peak |\n|---|---|---|---:|---:|")
    for name, tokens in (("LL", args.ll_tokens), ("HL", args.hl_tokens)):
        for mb in args.micro_batch:
            for ckpt in (False, True):
                layer, _, outside = rates[ckpt]
                act = mb * tokens * (24 * layer + outside)
                if ckpt:  # backward recomputes one layer at a time: one layer's full activations on top
                    act += mb * tokens * rates[False][0]
                peak = 2 * trained + 2 * frozen + grads + casts + logits + act
                print(f"| {name} | {mb} x {tokens} | {'yes' if ckpt else 'no'} | {act / GiB:.2f} | {peak / GiB:.2f} |")


def off(model):
    """--grad-ckpt off again (the name from transformers 5.2x on, or the older one)."""
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def gpu(args):
    dev = args.device
    name = torch.cuda.get_device_name(dev)
    ll, hl = build(args.config, 24, dev, 0), build(args.config, 24, dev, 1)
    ref, sft = grpo.frozen_copy(ll), grpo.frozen_copy(hl)
    opts = {}
    for key, m in (("ll", ll), ("hl", hl)):  # one step so that the AdamW moments exist, then free the gradients
        opts[key] = torch.optim.AdamW(m.parameters(), lr=1e-9)
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        opts[key].step()
        opts[key].zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated(dev)
    print(f"{name}: static (LL, HL trained with AdamW; p_ref, pi_SFT frozen) {static / GiB:.2f} GiB")
    print("| phase | micro-batch x tokens | --grad-ckpt | peak |\n|---|---|---|---:|")
    for key, tokens, model, frozen in (("LL", args.ll_tokens, ll, ref), ("HL", args.hl_tokens, hl, sft)):
        for mb in args.micro_batch:
            for ckpt in (False, True):
                if ckpt:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                else:
                    off(model)
                rows = 2 * mb  # two micro-batches: gradients accumulate across them
                prompt, comp = [[1] * (tokens - 512)] * rows, [[2] * 512] * rows
                cfg = SimpleNamespace(micro_batch=mb, updates=1, clip_eps=0.2, loss_norm="seq", grad_clip=1.0)
                torch.cuda.reset_peak_memory_stats(dev)
                try:
                    grpo.policy_update(model, frozen, opts[key.lower()], prompt, comp, torch.randn(rows), cfg, 0.04,
                                       512, 1.0)
                    peak = f"{torch.cuda.max_memory_allocated(dev) / GiB:.2f}"
                except torch.OutOfMemoryError:
                    peak = "out of memory"
                    opts[key.lower()].zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                print(f"| {key} update | {mb} x {tokens} | {'yes' if ckpt else 'no'} | {peak} |")
    off(ll)
    for rows in (args.sample_rows,):
        torch.cuda.reset_peak_memory_stats(dev)
        grpo.generate(ll, [[1] * (args.ll_tokens - 512)] * rows, 512, 1.0, eos_token_ids=[], seed=0)
        print(f"| LL sampling | {rows} rows x {args.ll_tokens} | - | "
              f"{torch.cuda.max_memory_allocated(dev) / GiB:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=CONFIG, help="a config.json (default: ../shared/models' Qwen2.5-0.5B)")
    ap.add_argument("--device", default="cpu", help="cpu (extrapolated from 1-2 layers) or cuda (measured)")
    ap.add_argument("--micro-batch", type=int, nargs="+", default=[2, 8], help="rows per forward/backward")
    ap.add_argument("--ll-tokens", type=int, default=1536, help="LL row: prompt with context + 512 new tokens")
    ap.add_argument("--hl-tokens", type=int, default=1024, help="HL row: its prompt + the 384-token context")
    ap.add_argument("--sample-rows", type=int, default=64, help="rows sampled at once (B x G) on the GPU")
    ap.add_argument("--probe", type=int, nargs=2, default=[128, 256], help="CPU: the two row lengths measured")
    args = ap.parse_args()
    torch.manual_seed(0)
    cpu(args) if args.device == "cpu" else gpu(args)


if __name__ == "__main__":
    main()
