"""
Static GPU memory of an experiment-5 run, computed (not measured) from a model config: the bytes of
weights, gradients, AdamW states and frozen copies, and of the rollouts' KV cache. Activations of the
training forward/backward come on top (they scale with --micro-batch x sequence length).

    python tests/bench_memory.py --config ../shared/models/qwen2.5-0.5b-config.json

The layout it assumes is the code's: the trained LL and HL keep fp32 weights (grpo.load_model(trainable=True))
with fp32 gradients and two fp32 AdamW moments; p_ref = q and pi_SFT are frozen bf16 copies (grpo.frozen_copy).
"""
import argparse
import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM

GiB = 2 ** 30


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a config.json (e.g. ../shared/models/qwen2.5-0.5b-config.json)")
    ap.add_argument("--rows", type=int, default=32, help="rollout rows sampled at once (B x G)")
    ap.add_argument("--tokens", type=int, default=1536, help="prompt + context + new tokens per row")
    args = ap.parse_args()
    cfg = AutoConfig.for_model(**json.load(open(args.config)))
    with torch.device("meta"):  # shapes only, no memory
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2  # k and v, bf16
    trained = n * (4 + 4 + 8)  # fp32 weights, fp32 grads, AdamW m and v
    frozen = n * 2             # bf16
    kv = kv_per_token * args.rows * args.tokens
    print(f"{args.config}: {n / 1e6:.1f}M parameters, KV cache {kv_per_token / 1024:.1f} KiB per token")
    for name, b in [("LL (trained: fp32 weights + grads + AdamW)", trained), ("HL (trained, same)", trained),
                    ("p_ref = q (frozen bf16, one copy)", frozen), ("pi_SFT (frozen bf16)", frozen),
                    (f"KV cache: {args.rows} rows x {args.tokens} tokens (bf16)", kv)]:
        print(f"  {name:48} {b / GiB:6.2f} GiB")
    total = 2 * trained + 2 * frozen + kv
    print(f"  {'total static, before activations':48} {total / GiB:6.2f} GiB")


if __name__ == "__main__":
    main()
