"""
A randomly initialised model folder from a config.json and a tokenizer folder: what a machine without weights
(a lent GPU) runs the entry scripts on. Figures from it measure speed and memory, never accuracy.

    python tests/random_model.py --tokenizer TOKENIZER_DIR --out /tmp/qwen-random
    python tests/random_model.py --tokenizer TOKENIZER_DIR --out /tmp/qwen-random --vocab-from-tokenizer

--vocab-from-tokenizer sizes the vocabulary to the tokenizer (and takes its BOS/EOS ids), so that every id the
random model samples decodes to text the grader can read; say so beside any figure measured with it (the
embedding and the output projection then differ from Qwen2.5-0.5B's 151,936 rows).
"""
import argparse
import json
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models", "qwen2.5-0.5b-config.json")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=CONFIG, help="a config.json (default: ../shared/models' Qwen2.5-0.5B)")
    ap.add_argument("--tokenizer", required=True, help="a folder with the tokenizer files (saved beside the model)")
    ap.add_argument("--out", required=True, help="the model folder to write")
    ap.add_argument("--vocab-from-tokenizer", action="store_true", help="vocabulary = the tokenizer's")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0 = the config's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = json.load(open(args.config))
    if args.vocab_from_tokenizer:
        cfg.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if args.layers:
        cfg.update(num_hidden_layers=args.layers, max_window_layers=args.layers)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: random {cfg.get('model_type')} with {n / 1e6:.1f}M parameters, vocabulary "
          f"{cfg['vocab_size']}{' (sized to the tokenizer)' if args.vocab_from_tokenizer else ''}")


if __name__ == "__main__":
    main()
