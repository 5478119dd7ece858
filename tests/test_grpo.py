"""Tests for grpo.py: the sampler against references, log-probs, the mask, advantages, the loss, the run."""
import hashlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import grpo
import hl_generator
import math_reward
from conftest import MATH_TRAIN, make_tiny_model, needs_smollm2

ROOT = os.path.join(os.path.dirname(__file__), "..")
PROBLEMS = ["What is 2 + 3?", "A rectangle has perimeter 24 inches. What is its largest possible area?",
            "Compute $\\dfrac{7}{8} - \\dfrac{1}{4}$ and simplify the result to lowest terms, please."]


def prompts(tokenizer, problems=PROBLEMS):
    return [grpo.encode(tokenizer, grpo.format_prompt(tokenizer, p)) for p in problems]


def naive_greedy(model, prompt, max_new_tokens, eos_ids):
    """The slow reference: no cache, no batch, the whole sequence through the model at every step."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tok = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(tok)
            seq.append(tok)
            if tok in eos_ids:
                break
    return out


def hf_greedy(model, prompt_ids, max_new_tokens, eos_ids, pad_id):
    """model.generate on the same left-padded batch; rows are cut after their first EOS."""
    ids, mask, _ = grpo._left_pad(prompt_ids, "cpu")
    ids[mask == 0] = pad_id
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=eos_ids, pad_token_id=pad_id)[:, ids.shape[1]:].tolist()
    cut = []
    for row in out:
        end = next((k + 1 for k, t in enumerate(row) if t in eos_ids), len(row))
        cut.append(row[:end])
    return cut


# -----------------------------------------------------------------------------
# the sampler


def test_greedy_equals_model_generate(tiny_model, tokenizer):
    p = prompts(tokenizer)
    assert len({len(x) for x in p}) == 3  # different lengths: left padding is exercised
    eos = grpo.eos_token_ids(tiny_model, tokenizer)
    ours, _ = grpo.generate(tiny_model, p, 24, temperature=0, eos_token_ids=eos)
    assert ours == hf_greedy(tiny_model, p, 24, eos, tokenizer.pad_token_id)


def test_greedy_equals_naive_decoder_with_rows_finishing_early(tiny_model, tokenizer):
    p = prompts(tokenizer)
    free, _ = grpo.generate(tiny_model, p, 20, temperature=0, eos_token_ids=[])
    assert all(len(t) == 20 for t in free)  # max_new_tokens holds
    # make a token that row 0 emits at step 4 the EOS: row 0 ends early and leaves the batch and the cache,
    # the other rows go on; every row must still equal its own slow, unbatched decoding
    stop = free[0][4]
    ours, _ = grpo.generate(tiny_model, p, 20, temperature=0, eos_token_ids=[stop])
    assert len(ours[0]) <= 5 and ours[0][-1] == stop
    assert any(len(t) > len(ours[0]) for t in ours[1:])
    for row, prompt in zip(ours, p):
        assert row == naive_greedy(tiny_model, prompt, 20, [stop])


def test_eos_inside_prompt_does_not_end_the_row(tiny_model, tokenizer):
    eos = tokenizer.eos_token_id
    p = prompts(tokenizer)[0]
    free, _ = grpo.generate(tiny_model, [p], 12, temperature=0, eos_token_ids=[])
    if eos in free[0]:
        pytest.skip("the tiny model emits the EOS itself")
    assert eos in p  # the chat template closes the system and user turns with <|im_end|>
    ours, _ = grpo.generate(tiny_model, [p], 12, temperature=0, eos_token_ids=[eos])
    assert ours == free and len(ours[0]) == 12


def test_shared_prefill_equals_separate_rows(tiny_model, tokenizer):
    # G identical prompts share one prefill; greedy rows must equal one row decoded alone
    p = prompts(tokenizer)
    ours, _ = grpo.generate(tiny_model, [p[0]] * 4 + [p[1]] * 4, 16, temperature=0, eos_token_ids=[])
    alone, _ = grpo.generate(tiny_model, [p[1]], 16, temperature=0, eos_token_ids=[])
    assert all(r == ours[0] for r in ours[:4]) and all(r == alone[0] for r in ours[4:])


def test_seed_reproduces(tiny_model, tokenizer):
    p = prompts(tokenizer)[:2] * 3
    a, la = grpo.generate(tiny_model, p, 16, temperature=1.0, seed=7)
    b, lb = grpo.generate(tiny_model, p, 16, temperature=1.0, seed=7)
    c, _ = grpo.generate(tiny_model, p, 16, temperature=1.0, seed=8)
    assert a == b and la == lb and a != c


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3, 0])
def test_sampler_logprobs_equal_sequence_logprobs(tiny_model, tokenizer, temperature):
    p = prompts(tokenizer)
    rows = [x for x in p for _ in range(3)]
    tokens, logps = grpo.generate(tiny_model, rows, 16, temperature, seed=0)
    with torch.no_grad():
        recomputed, mask = grpo.sequence_logprobs(tiny_model, rows, tokens, temperature, chunk_tokens=7)
    sampled, _ = grpo.pad_completions(logps, value=0.0)
    assert (recomputed - sampled).abs().mul(mask).max().item() < 1e-4


def test_sequence_logprobs_equal_plain_forward(tiny_model, tokenizer):
    # one row at a time, no padding, full logits: the textbook computation
    p = prompts(tokenizer)
    completions = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    with torch.no_grad():
        ours, mask = grpo.sequence_logprobs(tiny_model, p, completions, 0.8, chunk_tokens=2)
        for i, (prompt, comp) in enumerate(zip(p, completions)):
            logits = tiny_model(torch.tensor([prompt + comp])).logits[0, len(prompt) - 1:-1] / 0.8
            ref = logits.log_softmax(-1).gather(1, torch.tensor(comp)[:, None]).squeeze(1)
            assert torch.allclose(ours[i, :len(comp)], ref, atol=1e-5)
            assert mask[i].sum() == len(comp)


def test_sequence_logprobs_gradient_through_chunks(tiny_model, tokenizer):
    p = prompts(tokenizer)[:2]
    comps = [[5, 6, 7, 8], [9, 10]]
    grads = []
    for chunk in (1, 1000):
        tiny_model.zero_grad()
        lp, mask = grpo.sequence_logprobs(tiny_model, p, comps, 1.0, chunk_tokens=chunk)
        (lp * mask).sum().backward()
        grads.append(tiny_model.model.embed_tokens.weight.grad.clone())
    scale = grads[1].abs().max()
    assert (grads[0] - grads[1]).abs().max() < 1e-5 * scale  # float32 summation order only


def test_completion_mask_includes_eos_and_nothing_after():
    eos = 2
    comps = [[5, 6, eos], [7, eos], [8, 9, 10, 11]]  # two ended by EOS, one cut at the budget
    ids, mask = grpo.pad_completions(comps)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert ids[0, 2] == eos and ids[1, 1] == eos  # the stop token is in the loss


# -----------------------------------------------------------------------------
# advantages, KL, loss


def test_group_advantages_zero_mean_per_group():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.4, 0.6, 0.8])
    a = grpo.group_advantages(r, 4)
    assert torch.allclose(a.view(3, 4).mean(1), torch.zeros(3), atol=1e-7)
    assert torch.allclose(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert torch.all(a[4:8] == 0)  # a zero-variance group teaches nothing
    s = grpo.group_advantages(r, 4, scale_by_std=True)
    assert torch.allclose(s[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3)


def test_loss_gradient_at_ratio_one_is_reinforce():
    torch.manual_seed(0)
    logp = (-torch.rand(3, 5)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    A = torch.tensor([0.5, -1.0, 2.0])
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, A, mask, clip_eps=0.2, beta=0.0, norm="seq")
    loss.backward()
    # hand computation: d/d logp_it of -(1/N) sum_i A_i / |y_i| sum_t logp_it
    expected = -(A[:, None] / mask.sum(1, keepdim=True)) * mask / 3
    assert torch.allclose(logp.grad, expected)
    logp.grad = None
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, A, mask, 0.2, 0.0, norm="token", max_len=10)
    loss.backward()
    assert torch.allclose(logp.grad, -A[:, None] * mask / (3 * 10))  # Dr. GRPO: sum / (rows * budget)


def test_clipped_tokens_carry_no_gradient():
    logp = torch.zeros(1, 2, requires_grad=True)
    old = torch.tensor([[-0.5, 0.0]])  # ratio e^0.5 = 1.65 > 1.2 on token 0, 1 on token 1
    loss, stats = grpo.grpo_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 2), 0.2, 0.0)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0
    assert stats["clip_frac"] == 0.5


def test_kl_is_zero_for_equal_policies_and_positive_otherwise():
    logp = -torch.rand(4, 6)
    assert torch.all(grpo.k3_kl(logp, logp) == 0)
    assert torch.all(grpo.k3_kl(logp, logp - 0.3) > 0)
    mask = torch.ones(4, 6)
    _, stats = grpo.grpo_loss(logp, logp, logp, torch.zeros(4), mask, 0.2, 0.1)
    assert stats["kl"] == 0.0


def test_policy_update_is_independent_of_micro_batch(tokenizer):
    p = prompts(tokenizer)[:2]
    rows = [x for x in p for _ in range(2)]
    comps = [[5, 6, 7], [8, 9], [10], [11, 12, 13, 14]]
    adv = torch.tensor([0.5, -0.5, 1.0, -1.0])
    weights = []
    for mb in (1, 4):
        model = make_tiny_model(tokenizer, seed=1)
        ref = grpo.frozen_copy(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = SimpleNamespace(micro_batch=mb, updates=1, clip_eps=0.2, loss_norm="seq", grad_clip=0)
        grpo.policy_update(model, ref, opt, rows, comps, adv, cfg, beta=0.1, max_len=8, temperature=1.0)
        weights.append(model.model.embed_tokens.weight.detach().clone())
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


# -----------------------------------------------------------------------------
# --precision bf16 (the GPU's arithmetic, run here under CPU autocast) and training memory


def bf16_model(tokenizer, seed=0):
    """A tiny model as load_model(precision="bf16", trainable=True) leaves it: fp32 weights, bf16 compute."""
    model = make_tiny_model(tokenizer, seed=seed)
    model.compute_dtype = torch.bfloat16
    return model


def test_bf16_path_really_computes_in_bf16(tokenizer):
    p = prompts(tokenizer)
    comps = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    fp32, bf16 = make_tiny_model(tokenizer), bf16_model(tokenizer)
    with torch.no_grad():
        a, mask = grpo.sequence_logprobs(fp32, p, comps)
        b, _ = grpo.sequence_logprobs(bf16, p, comps)
    gap = (a - b).abs().mul(mask).max().item()
    assert 1e-4 < gap < 0.2  # bf16 rounding is there, and small


def test_bf16_policy_equal_to_its_reference_has_zero_kl(tokenizer):
    # the frozen copy runs the policy's own path, so at step 1 the KL is 0; a pure bf16 copy (the old layout)
    # would not be: this is what tells the two apart
    p = prompts(tokenizer)
    comps = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    model = bf16_model(tokenizer)
    with torch.no_grad():
        lp, mask = grpo.sequence_logprobs(model, p, comps)
        ref, _ = grpo.sequence_logprobs(grpo.frozen_copy(model), p, comps)
        pure, _ = grpo.sequence_logprobs(grpo.frozen_copy(model).to(torch.bfloat16), p, comps)
    kl = lambda r: (grpo.k3_kl(lp, r) * mask).sum().item() / mask.sum().item()  # noqa: E731
    assert kl(ref) < 1e-5
    assert kl(pure) > 1e-5
    # and so does a whole first update with beta > 0, as a run logs it
    cfg = SimpleNamespace(micro_batch=2, updates=1, clip_eps=0.2, loss_norm="seq", grad_clip=1.0)
    stats = grpo.policy_update(model, grpo.frozen_copy(model), torch.optim.AdamW(model.parameters()), p, comps,
                               torch.tensor([1.0, -1.0, 0.5]), cfg, beta=0.04, max_len=4, temperature=1.0)
    assert stats["kl"] < 1e-5


def test_bf16_sampler_keeps_its_contract(tokenizer):
    model = bf16_model(tokenizer)
    p = prompts(tokenizer)
    eos = grpo.eos_token_ids(model, tokenizer)
    ours, _ = grpo.generate(model, p, 16, temperature=0, eos_token_ids=eos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours == hf_greedy(model, p, 16, eos, tokenizer.pad_token_id)
    rows = [x for x in p for _ in range(2)]
    tokens, logps = grpo.generate(model, rows, 16, 1.0, seed=0)
    with torch.no_grad():
        recomputed, mask = grpo.sequence_logprobs(model, rows, tokens, 1.0)
    sampled, _ = grpo.pad_completions(logps, value=0.0)
    assert (recomputed - sampled).abs().mul(mask).max().item() < 0.05  # bf16 rounding of different kernels


def test_kv_cache_is_written_in_place_in_the_compute_dtype():
    cache = grpo.KVCache(max_len=6, dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, 4, 3), torch.randn(2, 1, 4, 3)
    K, V = cache.update(k, v, 0)
    cache.length = 4
    K2, _ = cache.update(k[:, :, :1] + 1, v[:, :, :1], 0)
    assert K.dtype == torch.bfloat16 and K.shape[2] == 4 and K2.shape[2] == 5
    assert K2.data_ptr() == K.data_ptr()  # the same buffer, a longer view: nothing was copied
    assert torch.equal(K2[:, :, :4], k.bfloat16()) and torch.equal(K2[:, :, 4], (k[:, :, 0] + 1).bfloat16())


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    p = prompts(tokenizer)
    comps = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    grads = []
    for ckpt in (False, True):
        model = make_tiny_model(tokenizer, seed=2).train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lp, mask = grpo.sequence_logprobs(model, p, comps)
        (lp * mask).sum().backward()
        grads.append(torch.cat([q.grad.flatten() for q in model.parameters()]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_policy_update_frees_the_gradients(tokenizer):
    model = make_tiny_model(tokenizer)
    cfg = SimpleNamespace(micro_batch=2, updates=1, clip_eps=0.2, loss_norm="seq", grad_clip=1.0)
    rows = prompts(tokenizer)[:2]
    grpo.policy_update(model, None, torch.optim.AdamW(model.parameters()), rows, [[5, 6], [7]],
                       torch.tensor([1.0, -1.0]), cfg, beta=0.0, max_len=4, temperature=1.0)
    assert all(q.grad is None for q in model.parameters())


# -----------------------------------------------------------------------------
# data and prompts


@pytest.mark.skipif(not os.path.exists(MATH_TRAIN), reason="../shared/data absent")
def test_limit_on_training_data_is_a_seeded_sample_across_subjects():
    """math_train.jsonl is sorted by subject: its first 200 problems are all Algebra."""
    first = grpo.load_problems(MATH_TRAIN, 200)
    drawn = grpo.load_problems(MATH_TRAIN, 200, seed=0, sample=True)
    assert {p["subject"] for p in first} == {"Algebra"}  # evaluation keeps the first N (one set for every seed)
    assert len(drawn) == 200 and len({p["subject"] for p in drawn}) >= 5, "--limit trained on one subject"
    assert drawn == grpo.load_problems(MATH_TRAIN, 200, seed=0, sample=True), "the sample is not seeded"
    assert drawn != grpo.load_problems(MATH_TRAIN, 200, seed=1, sample=True)


def test_load_problems_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": oops}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        grpo.load_problems(str(path))
    path.write_text('{"problem": "1+1?", "solution": "so $\\\\boxed{2}$"}\n{"question": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: no 'problem'"):
        grpo.load_problems(str(path))
    assert grpo.load_problems(str(path), limit=1)[0]["answer"] == "2"  # taken from the solution's box


def test_ops_and_batches_are_deterministic():
    assert grpo.ops_problems(5, seed=3) == grpo.ops_problems(5, seed=3)
    assert grpo.ops_problems(5, seed=3) != grpo.ops_problems(5, seed=4)
    a = [grpo.batch_indices(10, 4, s, 0) for s in range(5)]
    assert a == [grpo.batch_indices(10, 4, s, 0) for s in range(5)]
    assert sorted(a[0] + a[1] + grpo.batch_indices(10, 4, 2, 0)[:2]) == list(range(10))  # an epoch is a permutation


RULES = {"star": lambda a, b: a + b, "diamond": lambda a, b: a * b, "bullet": lambda a, b: a - b,
         "heartsuit": lambda a, b: b - a}


def _operands(p):  # "Compute $3 \\star 5$." -> ("star", 3, 5)
    a, op, b = p["problem"][len("Compute $"):-2].split(" ")
    return op[1:], int(a), int(b)


def test_ops_task_is_seeded_disjoint_and_correct_by_construction():
    from math_reward import reward
    digest = hashlib.sha256(json.dumps([grpo.ops_problems(1000, 0, "train"), grpo.ops_problems(1000, 0, "test")],
                                       sort_keys=True).encode()).hexdigest()
    assert digest.startswith("714264f60535132a")  # the problems every `ops` figure in the README was measured on
    assert grpo.load_problems("ops", 20, seed=3) == grpo.load_problems("ops", 20, seed=3)
    assert grpo.load_problems("ops", 20, seed=3) != grpo.load_problems("ops", 20, seed=4)
    train, test = grpo.load_problems("ops", seed=0), grpo.load_problems("ops-test", seed=1)
    assert len(test) == len({p["problem"] for p in test}) >= 200                  # each test problem once
    assert sorted(p["problem"] for p in test) == sorted(p["problem"] for p in grpo.load_problems("ops-test", seed=2))
    unordered = lambda rows: {tuple(sorted(_operands(p)[1:])) for p in rows}      # noqa: E731
    assert not unordered(train) & unordered(test)  # neither a op b nor b op a of a test problem is trained on
    assert len({p["problem"] for p in train}) == 80
    for p in train[:100] + test:
        op, a, b = _operands(p)
        assert a != b and p["answer"] == str(RULES[op](a, b)) and p["subject"] == f"Operator \\{op}"
        assert reward(p["solution"], p["answer"]) == 1.0 and reward(f"\\boxed{{{RULES[op](a, b) + 1}}}", p["answer"]) == 0.0


def test_ops_mix_holds_out_operator_pairs_so_the_nearest_example_can_mislead():
    train, test = grpo.load_problems("ops-mix", seed=0), grpo.load_problems("ops-mix-test")
    key = lambda p: (_operands(p)[0], *sorted(_operands(p)[1:]))  # noqa: E731  (operator, unordered pair)
    assert len(test) == len({p["problem"] for p in test}) == 104 and not {key(p) for p in train} & {key(p) for p in test}
    for p in test:  # each test pair is trained on with the other 2 operators only
        pair, op = sorted(_operands(p)[1:]), _operands(p)[0]
        with_pair = {_operands(q)[0] for q in grpo.load_problems("ops-mix-test") if sorted(_operands(q)[1:]) == pair}
        assert op in with_pair and len(with_pair) == 2
        assert {_operands(q)[0] for q in train if sorted(_operands(q)[1:]) == pair} == set(RULES) - with_pair
    for i, pair in enumerate(grpo.OPS_HELDOUT):  # even pairs: + and x held out; odd: the two differences
        held = {"star", "diamond"} if i % 2 == 0 else {"bullet", "heartsuit"}
        assert {_operands(p)[0] for p in test if tuple(sorted(_operands(p)[1:])) == pair} == held
    for p in test:  # no mirror: no training problem on x's pair has x's answer (a \\bullet b = b \\heartsuit a)
        pair = sorted(_operands(p)[1:])
        assert all(q["answer"] != p["answer"] for q in train if sorted(_operands(q)[1:]) == pair)
    for p in train[:100] + test:
        op, a, b = _operands(p)
        assert p["answer"] == str(RULES[op](a, b)) and p["subject"] == "Operators"
    same = lambda pairs: sum(_operands({"problem": c[0]})[0] == _operands(x)[0] for x, c in pairs) / len(pairs)  # noqa
    for task in ("ops", "ops-mix"):  # the share of D_SFT pairs and retrieved examples with x's operator (README)
        train, test = grpo.load_problems(task, seed=0), grpo.load_problems(task + "-test")
        sft = same(hl_generator.build_sft_pairs(train, test))
        retrieved = same([*zip(test, hl_generator.retrieve(test, train))])
        assert (sft, retrieved) == (1.0, 1.0) if task == "ops" else 0.2 <= min(sft, retrieved) <= max(sft, retrieved) <= 0.6


def test_ops_retrieval_finds_the_operator_and_carries_the_answer_below_chance():
    train, test = grpo.load_problems("ops"), grpo.load_problems("ops-test")
    contexts = hl_generator.retrieve(test, train)
    assert all(c is not None for c in contexts)
    for p, c in zip(test, contexts):
        op = _operands(p)[0]
        assert f"\\{op} " in c[0] and not hl_generator.restates(c[0], p["problem"])   # the same operator, other digits
    carried = sum(math_reward.carries_answer(c, p["answer"]) for p, c in zip(test, contexts)) / len(test)
    same_op = {op: [q["answer"] for q in train if _operands(q)[0] == op] for op in RULES}
    chance = sum(same_op[_operands(p)[0]].count(p["answer"]) / len(same_op[_operands(p)[0]]) for p in test) / len(test)
    assert carried <= chance  # a retrieved example carries x's answer no more often than a random one would


def test_drop_overlap_by_id_and_by_text(capsys):
    train = [{"problem": "What is $2+2$?", "unique_id": "a"}, {"problem": "what is 2+2?", "unique_id": "b"},
             {"problem": "What is 3+3?", "unique_id": "c"}, {"problem": "Other", "unique_id": "e1"}]
    held = [{"problem": "What is 2+2?", "unique_id": "e1"}]
    assert [p["unique_id"] for p in hl_generator.drop_overlap(train, held)] == ["c"]
    assert "3 of 4 removed" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="every training problem"):
        hl_generator.drop_overlap(held, held)


def test_random_streams_differ_by_purpose_and_reproduce(tiny_model, tokenizer):
    seeds = {(p, s): grpo.stream_seed(0, p, s) for p in grpo.PURPOSES for s in range(3)}
    assert len(set(seeds.values())) == len(seeds)                    # no two (purpose, step) share a stream
    assert grpo.stream_seed(0, "ll", 2) == seeds[("ll", 2)] != grpo.stream_seed(1, "ll", 2)
    p = prompts(tokenizer)[:1] * 4
    draw = lambda purpose: grpo.generate(tiny_model, p, 8, 1.0, seed=grpo.stream_seed(0, purpose, 0))[0]  # noqa: E731
    assert draw("ll") == draw("ll") and draw("ll") != draw("hl")      # the old seed + idx vs seed * K + idx collided


def test_format_prompt_places_context_before_problem(tokenizer):
    text = grpo.format_prompt(tokenizer, "What is 2+2?", ("What is 1+1?", "It is $\\boxed{2}$."))
    assert text.index("### Example") < text.index("What is 1+1?") < text.index("### Problem") < text.index("2+2")
    assert "\\boxed{}" in text and text.endswith("assistant\n")


# -----------------------------------------------------------------------------
# the script


def run_grpo(args, cwd):
    cmd = [sys.executable, os.path.join(ROOT, "grpo.py")] + args
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_script_runs_checkpoints_and_resumes_exactly(tiny_model_dir, tmp_path):
    common = ["--model", tiny_model_dir, "--batch-problems", "2", "--group-size", "2", "--max-new-tokens", "6",
              "--save-every", "2", "--device", "cpu", "--lr", "1e-3"]
    run_grpo(common + ["--steps", "3", "--out", "straight"], tmp_path)
    run_grpo(common + ["--steps", "2", "--out", "split"], tmp_path)
    assert os.path.exists(tmp_path / "split" / "ckpt" / "policy" / "config.json")
    out = run_grpo(["--resume", "split", "--steps", "3"], tmp_path)
    assert "resumed from" in out
    straight = [json.loads(l) for l in open(tmp_path / "straight" / "metrics.jsonl")]
    split = [json.loads(l) for l in open(tmp_path / "split" / "metrics.jsonl")]
    assert [r["step"] for r in split] == [1, 2, 3]
    for a, b in zip(straight, split):  # the resumed run continues exactly: same rollouts, same updates
        for key in ("reward", "len", "kl", "loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


@needs_smollm2
def test_greedy_equals_model_generate_on_smollm2(smollm2_folder):
    model, tokenizer = grpo.load_model(smollm2_folder, device="cpu")
    p = prompts(tokenizer)
    eos = grpo.eos_token_ids(model, tokenizer)
    ours, _ = grpo.generate(model, p, 32, temperature=0, eos_token_ids=eos)
    assert ours == hf_greedy(model, p, 32, eos, tokenizer.pad_token_id)


def test_rollouts_score_r_task_and_the_box_metric(tokenizer, monkeypatch):
    texts = ["so \\boxed{5}", "so \\boxed{}", "so \\boxed{ }", "no box", "\\boxed{4}"]
    seen = []

    def generate(model, prompt_ids, *a, **k):
        seen.append(prompt_ids)
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], [[0.0]] * 5
    monkeypatch.setattr(grpo, "generate", generate)
    batch = [{"problem": "What is 2 + 3?", "answer": "5"}, {"problem": "What is 1 + 4?", "answer": "5"}]
    cfg = grpo.Config(max_new_tokens=8)
    roll = grpo.rollouts(None, tokenizer, batch, [[None, None, None], [None, ("x'", "y'")]], cfg, [2], seed=0)
    assert roll.r_task.tolist() == [1, 0, 0, 0, 0]
    assert roll.boxed.tolist() == [1, 0, 0, 0, 1]   # a non-empty answer in a box
    assert seen[0] == roll.prompt_ids and len(roll.prompt_ids) == 5
    assert roll.prompt_ids[4] == grpo.encode(tokenizer, grpo.format_prompt(tokenizer, batch[1]["problem"], ("x'", "y'")))
