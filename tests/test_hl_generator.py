"""Tests for hl_generator.py: the parser, D_SFT on the real files, SFT, the HL reward, the KL to pi_SFT."""
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

import alternate
import grpo
import hl_generator as hl
from conftest import MATH500, MATH_TRAIN, make_tiny_model

ROOT = os.path.join(os.path.dirname(__file__), "..")

# -----------------------------------------------------------------------------
# the parser


@pytest.mark.parametrize("text, expected", [
    ("Problem: What is 1+1?\nSolution: 1+1 = 2, so $\\boxed{2}$.", ("What is 1+1?", "1+1 = 2, so $\\boxed{2}$.")),
    ("Sure! Here is one.\n**Problem:** Find $x$ if $2x=4$.\n**Solution:** $x=\\boxed{2}$",
     ("Find $x$ if $2x=4$.", "$x=\\boxed{2}$")),
    ("problem: a\nsolution: \\boxed{1}", ("a", "\\boxed{1}")),
])
def test_parse_well_formed(text, expected):
    assert hl.parse_context(text) == expected


@pytest.mark.parametrize("text", [
    "",                                                        # empty
    "Problem: What is 1+1?\nSolution: We add the two numbers and get",  # truncated: no box yet
    "Problem: What is 1+1?",                                   # no solution
    "Solution: \\boxed{2}\nProblem: what?",                    # wrong order
    "Problem: \nSolution: \\boxed{2}",                         # empty problem
    "Problem: x\nSolution: \\boxed{2",                         # unbalanced box
    "just some text \\boxed{3}",
])
def test_parse_rejects_malformed(text):
    assert hl.parse_context(text) is None


def test_parse_hostile_is_bounded():
    for text in ("Problem:" * 20_000, "Problem: " + "{" * 50_000 + "Solution: \\boxed{1}",
                 "Problem: a\x00\nSolution: \\boxed{__import__('os')}", "Solution:" * 30_000 + "Problem:"):
        start = time.perf_counter()
        hl.parse_context(text)
        assert time.perf_counter() - start < 2.0


# -----------------------------------------------------------------------------
# the leakage guard (rule 1b)


@pytest.mark.parametrize("example, x, same", [
    ("What is 3 + 4?", "What is 3 + 4?", True),
    ("what is  3+4 ?", "What is 3 + 4?", True),                     # case, spacing
    ("Compute $\\frac{1}{2}\\,+\\;3$.", "compute \\frac{1}{2} + 3.", True),  # $ and LaTeX spacing
    ("What is 4 + 3?", "What is 3 + 4?", True),                     # the mirror: the same bag of words
    ("What is 5 + 2?", "What is 3 + 4?", False),                    # another sum with the same answer
    ("What is 3 - 4?", "What is 3 + 4?", False),                    # another operator
    ("Find the area of a triangle with base 4 and height 6.", "A triangle has base 10 and height 3. What is its area?",
     False),
])
def test_restates(example, x, same):
    assert hl.restates(example, x) is same
    text = f"Problem: {example}\nSolution: so $\\boxed{{7}}$."
    assert (hl.parse_context(text, x) is None) is same           # a restatement is no context
    assert hl.parse_context(text) is not None                    # ... but it is in the format


def test_generate_contexts_counts_restated_apart_from_unparsed(tokenizer, monkeypatch):
    outputs = ["Problem: What is 4 + 3?\nSolution: $\\boxed{7}$",     # restates x (its mirror)
               "Problem: What is 5 + 2?\nSolution: $\\boxed{7}$",     # a context
               "no format at all", "Problem: What is 1 + 1?\nSolution: $\\boxed{2}$"]
    monkeypatch.setattr(hl, "generate", lambda *a, **k: ([tokenizer.encode(o) for o in outputs], None))
    problems = [{"problem": "What is 3 + 4?", "answer": "7"}, {"problem": "What is 9 + 9?", "answer": "18"}]
    contexts, _, _, stats = hl.generate_contexts(None, tokenizer, problems, 2, 8, 1.0, [2])
    assert contexts == [[None, ("What is 5 + 2?", "$\\boxed{7}$")], [None, ("What is 1 + 1?", "$\\boxed{2}$")]]
    assert stats == {"parse_rate": 0.75, "ctx_self": 0.25}


def test_format_round_trip():
    example = ("What is $3 \\cdot 4$?", "We multiply: $3 \\cdot 4 = \\boxed{12}$.")
    assert hl.parse_context(grpo.format_context(example)) == example  # what SFT teaches is what parses

# -----------------------------------------------------------------------------
# D_SFT


@pytest.mark.skipif(not (os.path.exists(MATH_TRAIN) and os.path.exists(MATH500)), reason="../shared/data absent")
def test_sft_pairs_on_the_real_files():
    train = grpo.load_problems(MATH_TRAIN)
    test = grpo.load_problems(MATH500)
    start = time.perf_counter()
    pairs = hl.build_sft_pairs(train + test[:50], test)  # MATH-500 problems slipped into train must not appear
    elapsed = time.perf_counter() - start
    held_ids = {p["unique_id"] for p in test}
    held_text = {hl.normalize_text(p["problem"]) for p in test}
    by_text = {hl.normalize_text(p["problem"]): p for p in train}
    assert len(pairs) == len(train)
    for x, (xp, yp) in pairs:
        assert x["unique_id"] not in held_ids
        assert hl.normalize_text(xp) not in held_text
        assert hl.normalize_text(xp) != hl.normalize_text(x["problem"])  # never x itself
        assert by_text[hl.normalize_text(xp)]["subject"] == x["subject"]  # same subject
    assert elapsed < 60, f"D_SFT took {elapsed:.0f}s"  # seconds, not minutes (generous bound for slow CI)


def test_the_verbs_task_files_load_are_disjoint_and_retrieve_the_same_verb(tmp_path):
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "verbs_task.py"), str(tmp_path)], check=True)
    train, test = grpo.load_problems(str(tmp_path / "train.jsonl")), grpo.load_problems(str(tmp_path / "test.jsonl"))
    assert len(train) == 600 and len(test) == 48 and not {p["problem"] for p in train} & {p["problem"] for p in test}
    for p in train + test:  # the answer is the number plus the verb's addend, and the solution says so
        n, add = int(p["problem"].split()[1]), int(p["solution"].split()[5].rstrip(":"))
        assert p["answer"] == str(n + add) and hl.extract_boxed(p["solution"]) == p["answer"]
    for x, (xp, yp) in zip(test, hl.retrieve(test, train)):  # an example of x's verb, never x itself
        assert xp.split()[-1] == x["problem"].split()[-1] and xp != x["problem"]


# -----------------------------------------------------------------------------
# SFT


def test_sft_loss_counts_target_tokens_only(tiny_model, tokenizer):
    prompt = grpo.encode(tokenizer, hl.hl_prompt(tokenizer, "What is 2+2?"))
    target = [100, 200, 300, 2]
    loss = hl.sft_loss(tiny_model, [prompt], [target])
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prompt + target])).logits[0]
    lp = logits.log_softmax(-1)
    # by hand: only the positions that predict target tokens, none of the prompt's own next-token terms
    by_hand = -sum(lp[len(prompt) - 1 + t, tok] for t, tok in enumerate(target)) / len(target)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    other_prompt = grpo.encode(tokenizer, hl.hl_prompt(tokenizer, "What is 2+2? Think."))
    assert hl.sft_loss(tiny_model, [other_prompt], [target]).item() != pytest.approx(loss.item())  # it conditions


def test_sft_overfits_a_tiny_set(tokenizer):
    model = make_tiny_model(tokenizer)
    pairs = [({"problem": f"What is {a} + 1?"}, (f"What is {a} + 2?", f"{a} + 2 = {a + 2}, so $\\boxed{{{a + 2}}}$."))
             for a in range(8)]
    cfg = alternate.Config(max_context_tokens=64, sft_steps=30, sft_batch=4, sft_lr=3e-3, sft_heldout=0)
    prompts = [grpo.encode(tokenizer, hl.hl_prompt(tokenizer, x["problem"])) for x, _ in pairs]
    targets = [grpo.encode(tokenizer, grpo.format_context(c)) + [tokenizer.eos_token_id] for _, c in pairs]
    before = hl.sft_loss(model, prompts, targets).item()
    hl.sft(model, tokenizer, pairs, cfg, tokenizer.eos_token_id, log=lambda *_: None)
    after = hl.sft_loss(model, prompts, targets).item()
    assert after < 0.5 * before

@pytest.mark.skipif(not os.path.exists(MATH_TRAIN), reason="../shared/data absent")
def test_sft_draws_its_batches_and_held_out_pairs_across_subjects(tokenizer, monkeypatch):
    """math_train.jsonl is sorted by subject (its first 1,744 rows are Algebra): SFT in file order saw one subject."""
    train = grpo.load_problems(MATH_TRAIN)[::8]  # 1,500 rows, still sorted by subject
    pairs = hl.build_sft_pairs(train)
    subject = {tuple(grpo.encode(tokenizer, hl.hl_prompt(tokenizer, x["problem"]))): x["subject"] for x, _ in pairs}
    held, stepped = [], []
    monkeypatch.setattr(hl, "sft_loss", lambda m, p, t, n=None: held.extend(p) or torch.tensor(0.0))  # held-out only
    monkeypatch.setattr(hl, "sft_step", lambda m, o, p, t: stepped.extend(p) or 0.0)
    cfg = alternate.Config(max_context_tokens=384, sft_steps=5, sft_batch=4, sft_heldout=16)
    hl.sft(make_tiny_model(tokenizer), tokenizer, pairs, cfg, tokenizer.eos_token_id, log=lambda *_: None)
    held_subjects = {subject[tuple(p)] for p in held[:16]}
    step_subjects = {subject[tuple(p)] for p in stepped}
    assert len(held_subjects) >= 5, f"the held-out SFT pairs are not drawn across subjects: {held_subjects}"
    assert len(step_subjects) >= 5, f"the first SFT steps do not draw across subjects: {step_subjects}"
    assert not {tuple(p) for p in held} & {tuple(p) for p in stepped}, "a held-out pair was trained on"
    assert hl.sft_order(100, 10, 4, 6, seed=0) == hl.sft_order(100, 10, 4, 6, seed=0), "the order is not seeded"
    assert hl.sft_order(100, 10, 4, 6, seed=1) != hl.sft_order(100, 10, 4, 6, seed=0), "the seed does not change it"
    alone = hl.sft_order(100, 10, 4, 6, seed=0)
    monkeypatch.setattr(grpo, "world_size", lambda: 2)
    monkeypatch.setattr(grpo, "rank", lambda: 1)
    assert hl.sft_order(100, 10, 4, 6, seed=0) == alone, "under torchrun every rank must hold out and draw the same pairs"


# -----------------------------------------------------------------------------
# the HL reward and the KL to pi_SFT


def test_hl_reward_formula():
    r = torch.tensor([1.0, 0.0])
    logp = torch.tensor([[-1.0, -3.0, 0.0], [-0.5, -0.5, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    out = hl.hl_reward(r, logp, mask, alpha=0.5)
    assert torch.allclose(out, torch.tensor([1.0 + 0.5 * -2.0, 0.0 + 0.5 * -1.0]))
    assert torch.equal(hl.hl_reward(r, logp, mask, alpha=0.0), r)  # alpha = 0: task only


def test_kl_to_sft_is_zero_after_sft_and_beta_zero_drops_it(tokenizer, monkeypatch):
    hl_model = make_tiny_model(tokenizer, seed=2)
    sft_model = grpo.frozen_copy(hl_model)  # right after SFT: pi_theta == pi_SFT
    prompts = [grpo.encode(tokenizer, hl.hl_prompt(tokenizer, "What is 1+1?"))] * 2
    comps = [[10, 11, 12], [13, 14]]
    adv = torch.tensor([1.0, -1.0])
    seen = []

    real = grpo.grpo_loss

    def spy(logp, old_logp, ref_logp, *args, **kwargs):
        seen.append(ref_logp)
        return real(logp, old_logp, ref_logp, *args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_loss", spy)
    for beta in (0.1, 0.0):
        cfg = type("C", (), dict(micro_batch=2, updates=1, clip_eps=0.2, loss_norm="seq", grad_clip=0))
        opt = torch.optim.SGD(hl_model.parameters(), lr=0.0)
        stats = grpo.policy_update(hl_model, sft_model if beta else None, opt, prompts, comps, adv, cfg, beta, 8, 1.0)
        if beta:
            assert stats["kl"] == pytest.approx(0.0, abs=1e-6)
    assert seen[0] is not None and seen[1] is None  # beta_HL = 0: no reference pass, no KL term


def test_hl_step_gives_no_gradient_to_the_ll(tokenizer):
    hl_model, ll_model = make_tiny_model(tokenizer, seed=4), make_tiny_model(tokenizer, seed=5)
    ll_before = [p.clone() for p in ll_model.parameters()]
    cfg = replace(alternate.Config(), hl_group=2, ll_answers=2, max_context_tokens=8, max_new_tokens=6, lr=1e-3, micro_batch=4)
    problems = [{"problem": "What is 1 + 1?", "answer": "2"}, {"problem": "What is 2 + 2?", "answer": "4"}]
    opt = torch.optim.AdamW(hl_model.parameters(), lr=1e-3)
    record = hl.hl_step(hl_model, grpo.frozen_copy(hl_model), ll_model, opt, tokenizer, problems, cfg, 0, [2])
    assert all(torch.equal(a, b) for a, b in zip(ll_before, ll_model.parameters()))
    assert all(p.grad is None for p in ll_model.parameters())
    assert 0.0 <= record["parse_rate"] <= 1.0 and "kl" in record


def test_hl_step_samples_the_ll_at_hl_ll_temperature(tokenizer, monkeypatch):
    """--hl-ll-temperature sets the LL's temperature in the HL step only; -1 keeps --temperature."""
    hl_model, ll_model = make_tiny_model(tokenizer, seed=4), make_tiny_model(tokenizer, seed=5)
    problems = [{"problem": "What is 1 + 1?", "answer": "2"}]
    real, seen = grpo.generate, []

    def generate(model, prompts, max_new_tokens, temperature, *a, **k):
        if model is ll_model:
            seen.append(temperature)
        return real(model, prompts, max_new_tokens, temperature, *a, **k)

    monkeypatch.setattr(grpo, "generate", generate)
    monkeypatch.setattr(hl, "hl_update", lambda *a: {})
    for flag, expected in ((-1, 0.7), (0.0, 0.0), (0.3, 0.3)):
        cfg = replace(alternate.Config(), hl_group=2, max_context_tokens=4, max_new_tokens=2, hl_ll_temperature=flag)
        hl.hl_step(hl_model, None, ll_model, None, tokenizer, problems, cfg, 0, [2])
        assert seen.pop() == expected and cfg.temperature == 0.7  # the LL phase keeps --temperature

def test_hl_step_logs_the_right_operator_rate_of_the_hls_contexts(tokenizer, monkeypatch):
    hl_model, ll_model = make_tiny_model(tokenizer, seed=4), make_tiny_model(tokenizer, seed=5)
    problems = [{"problem": "Compute $3 \\star 5$.", "answer": "8"}, {"problem": "Compute $4 \\bullet 1$.", "answer": "3"}]
    right, wrong = ("Compute $1 \\star 2$.", "$\\boxed{3}$"), ("Compute $4 \\diamond 1$.", "$\\boxed{4}$")
    real = hl.generate_contexts

    def contexts(model, tok, batch, n, *a, **k):  # the HL writes a right and a wrong operator for x 1, wrong ones for x 2
        _, prompts, completions, stats = real(model, tok, batch, n, *a, **k)
        return [[right, wrong], [wrong, wrong]], prompts, completions, stats

    monkeypatch.setattr(hl, "generate_contexts", contexts)
    monkeypatch.setattr(hl, "hl_reward", lambda *a: torch.tensor([1.0, 0.0, 0.0, 0.0]))  # R_HL per context, 2 groups
    cfg = replace(alternate.Config(), hl_group=2, ll_answers=1, max_context_tokens=8, max_new_tokens=4, micro_batch=4)
    opt = torch.optim.AdamW(hl_model.parameters(), lr=1e-3)
    record = hl.hl_step(hl_model, grpo.frozen_copy(hl_model), ll_model, opt, tokenizer, problems, cfg, 0, [2])
    assert record["ctx_right_op"] == 0.25 and record["ctx_good"] == 0.25  # 1 + 2 = 3: right
    assert record["reward_spread"] == pytest.approx(0.25) and record["zero_var"] == 0.5  # std of (1, 0) and of (0, 0)


# -----------------------------------------------------------------------------
# SFT in alternate.py: refused with a clear message when no target fits


def test_sft_with_no_target_that_fits_says_so(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "alternate.py"), "--model", tiny_model_dir,
                           "--limit", "40", "--max-context-tokens", "5", "--out", "short", "--device", "cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "raise it" in proc.stderr  # a clear message, not a ZeroDivisionError
