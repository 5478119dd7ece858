"""What protects a run's numbers around the maths: checkpoints that load on any device, the round-0 baseline, one
verdict for one set of evaluation settings, a budget that cuts every answer said at once, one leakage threshold and
one context budget for every source, independent seeds, metrics that do not depend on the world size, files written
whole, one converter of the embedded model, SFT targets without BOS, flags that would do nothing refused."""
import copy
import json
import os
import shutil
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import alternate
import context_grpo
import eval_math500
import grpo
import hl_generator
from conftest import MATH500, make_tiny_model
from test_alternate import TINY as ALTERNATE_TINY
from test_alternate import alternate as run_alternate

TINY = ALTERNATE_TINY + ["--ll-steps", "1"]  # one LL step a round


def evals(folder):
    return [r for r in grpo.read_jsonl(os.path.join(folder, "metrics.jsonl")) if r["phase"] == "eval"]


def test_checkpoints_load_to_the_cpu_first(tokenizer, tmp_path, monkeypatch):
    """A GPU run's state.pt loads on a CPU, and under torchrun no rank loads all of it onto GPU 0."""
    model = make_tiny_model(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    grpo.save_checkpoint(str(tmp_path), 2, {"policy": model}, {"policy": opt}, tokenizer)
    seen, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("map_location")) or real_load(*a, **k))
    assert grpo.load_checkpoint(str(tmp_path), {"policy": model}, {"policy": opt}) == 2
    assert seen == ["cpu"]


def test_a_run_killed_before_its_first_checkpoint_keeps_its_round_0_baseline(tiny_model_dir, tmp_path):
    run_alternate(["--model", tiny_model_dir, "--out", "run"] + TINY, tmp_path)
    run = tmp_path / "run"
    for name in os.listdir(run):  # what a kill during SFT or the round-0 evaluation leaves
        if name in ("ckpt", "metrics.jsonl") or name.startswith("eval"):
            shutil.rmtree(run / name) if os.path.isdir(run / name) else os.remove(run / name)
    out = run_alternate(["--resume", "run"], tmp_path)
    assert [r["step"] for r in evals(run)] == [0, 1]
    assert "at round 0 -> " in out


def test_one_verdict_for_one_set_of_evaluation_settings(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"script": "alternate.py", **vars(alternate.Config(out=str(run)))}))
    for flag in ("--eval-limit", "--eval-max-new-tokens"):
        with pytest.raises(SystemExit, match=f"^{flag} 7: cannot change on resume"):
            grpo.parse_config(alternate.Config, ["--resume", str(run), flag, "7"])

    def record(step, n, tokens, low, high):
        return {"step": step, "eval/n": n, "eval/max_new_tokens": tokens, "eval/acc": (low + high) / 2,
                "eval/ci_low": low, "eval/ci_high": high, "eval/ctx_has_answer": 0.0}
    line = eval_math500.before_after([record(0, 3, 6, 0.0, 0.2), record(2, 20, 12, 0.5, 0.9)], with_contexts=True)
    assert "not compared" in line and "gain" not in line
    line = eval_math500.before_after([record(0, 20, 12, 0.0, 0.2), record(2, 20, 12, 0.5, 0.9)], with_contexts=True)
    assert "on 20 problems at 12 tokens: a gain: intervals apart" in line


def test_a_budget_that_cuts_every_answer_is_said_before_the_first_step_and_at_the_end(
        tiny_model_dir, tmp_path, tokenizer):
    out = run_alternate(["--model", tiny_model_dir, "--out", "run"] + TINY, tmp_path).splitlines()
    warning = next(i for i, l in enumerate(out) if l.startswith("WARNING:"))
    first_step = next(i for i, l in enumerate(out) if " ll step 1/" in l)
    assert warning < first_step and "--max-new-tokens 6" in out[warning] and "pass a larger" in out[warning]
    assert out[warning] in next(l for l in out if l.startswith("before/after"))
    cfg = alternate.Config()  # the demo's budget: silent on ops, said on MATH (the bare MATH command)
    ops = grpo.load_problems("ops", limit=50)
    assert context_grpo.budget_warnings(cfg, tokenizer, ops, ops) == []
    math = grpo.load_problems(MATH500, limit=50)
    assert "--max-new-tokens 48" in context_grpo.budget_warnings(cfg, tokenizer, math, math)[0]


def test_sft_reports_the_share_of_d_sft_over_the_budget(tokenizer):
    pairs = hl_generator.build_sft_pairs(grpo.load_problems("ops", limit=40))
    lengths = [len(grpo.encode(tokenizer, grpo.format_context(c), target=True)) + 1 for _, c in pairs]
    budget = sorted(lengths)[len(lengths) // 4]
    cfg = SimpleNamespace(max_context_tokens=budget, sft_heldout=0, sft_batch=2, sft_steps=1, seed=0, sft_lr=1e-5)
    dropped = hl_generator.sft(make_tiny_model(tokenizer), tokenizer, pairs, cfg, tokenizer.eos_token_id,
                               log=lambda *_: None)
    assert dropped == pytest.approx(sum(n > budget for n in lengths) / len(lengths))


def test_the_leakage_threshold_reaches_every_context_source():
    x = {"problem": "What is the sum of 3 and 5?", "answer": "8", "unique_id": "x"}
    near = {"problem": "What is the sum of 3 and 7?", "answer": "10", "unique_id": "near"}  # cosine 8/9 to x
    assert hl_generator.restates(near["problem"], x["problem"], 0.85)
    assert not hl_generator.restates(near["problem"], x["problem"], 0.9)
    for threshold, expected in ((0.9, hl_generator.as_example(near)), (0.85, None)):
        assert hl_generator.retrieve([x], [x, near], threshold) == [expected]
        for kind in ("retrieved", "random"):
            source = hl_generator.context_source(kind, [near], [x], 0, threshold)
            assert source([x], 2, 0, "ctx") == [[expected, expected]], kind
        assert len(hl_generator.build_sft_pairs([x, near], (), threshold)) == (2 if expected else 0)


def test_contexts_without_an_hl_are_held_to_the_hls_budget(tokenizer):
    pool = grpo.load_problems("ops", limit=200)
    size = lambda p: len(grpo.encode(tokenizer, grpo.format_context(hl_generator.as_example(p)), target=True))
    sizes = sorted(set(map(size, pool)))
    budget = sizes[len(sizes) // 2] + 1
    kept = hl_generator.within_budget(tokenizer, pool, budget)
    assert kept == [p for p in pool if size(p) + 1 <= budget] and 0 < len(kept) < len(pool)
    for kind in ("retrieved", "random"):
        contexts = hl_generator.context_source(kind, kept, pool[:50], 0)(pool[:50], 2, 0, "ctx")
        lengths = [len(grpo.encode(tokenizer, grpo.format_context(c), target=True)) for cs in contexts for c in cs if c]
        assert lengths and max(lengths) + 1 <= budget, kind
    with pytest.raises(SystemExit, match="--max-context-tokens 1: raise it"):
        hl_generator.within_budget(tokenizer, pool, 1)


def test_the_hls_batches_are_no_other_seeds_ll_batches():
    import numpy as np
    n, batch = 1000, 4
    for seed in range(4):
        for step in range(3):
            hl = grpo.batch_indices(n, batch, step, seed, "hl")
            assert hl != grpo.batch_indices(n, batch, step, seed + 1)  # was: seed s's HL = seed s+1's LL
            assert hl != grpo.batch_indices(n, batch, step, seed)
            ks = range(step * batch, (step + 1) * batch)  # the LL's stream is unchanged: (seed, epoch)
            old = [int(np.random.default_rng([seed, k // n]).permutation(n)[k % n]) for k in ks]
            assert grpo.batch_indices(n, batch, step, seed) == old


def test_two_ranks_log_what_one_process_logs(tokenizer):
    """merge_records of two ranks' halves equals the record of the whole batch: counts summed, a ratio weighted by
    its denominator (rank 0 has 3 contexts, rank 1 has 1), the std pooled."""
    prior = make_tiny_model(tokenizer, seed=5)
    batch = [{"problem": "What is 2 + 3?", "answer": "5"}, {"problem": "Compute 7 - 4.", "answer": "3"}]
    contexts = [[("What is 1 + 1?", "\\boxed{2}"), ("What is 2 + 2?", "\\boxed{4}"), ("1 + 3?", "\\boxed{4}")],
                [None, ("What is 9 - 1?", "It is \\boxed{8}."), None]]
    gen = torch.Generator().manual_seed(0)
    completions = [torch.randint(100, 2000, (2 + i,), generator=gen).tolist() for i in range(6)]
    sampler_logp = [(-torch.rand(len(c), generator=gen) * 20).tolist() for c in completions]
    cfg = SimpleNamespace(group_size=3, temperature=1.0, tau=5.0, util_reduce="mean")

    def record(rows, problems):
        stats = context_grpo.utilisation(prior, tokenizer, [batch[b] for b in problems], [contexts[b] for b in problems],
                                         [completions[i] for i in rows], [sampler_logp[i] for i in rows], cfg)[1]
        n_ctx = sum(c is not None for b in problems for c in contexts[b])
        return {**stats, "n_ctx": n_ctx, "accepted": 1 + problems[0], "acc": 0.5 * (1 + problems[0]), "time": len(rows)}
    whole = record(range(6), [0, 1])
    merged = grpo.merge_records([record(range(3), [0]), record(range(3, 6), [1])])
    assert merged["n_ctx"] == 4 and 0 < whole["util_clip"] < 1
    for key in ("util", "util_clip", "util_logp_ctx", "util_logp_q", "n_ctx"):
        assert merged[key] == pytest.approx(whole[key], abs=1e-5), key
    assert merged["accepted"] == 3 and merged["acc"] == pytest.approx(0.75) and merged["time"] == 3
    no_context = {"ctx_len": 0.0, "n_ctx": 0, "acc_ctx": float("nan")}  # what a step without contexts logs
    merged = grpo.merge_records([no_context, no_context])
    assert merged["ctx_len"] == 0.0 and merged["n_ctx"] == 0 and merged["acc_ctx"] != merged["acc_ctx"]


def test_a_kill_while_truncating_the_metrics_keeps_them_whole(tmp_path, monkeypatch):
    for step in range(4):
        grpo.log_jsonl(str(tmp_path), "metrics.jsonl", {"step": step})
    def killed(obj):  # a kill while the kept lines are written
        raise KeyboardInterrupt
    monkeypatch.setattr(grpo.json, "dumps", killed)
    with pytest.raises(KeyboardInterrupt):
        grpo.load_checkpoint(str(tmp_path), {}, {})
    monkeypatch.undo()
    assert [r["step"] for r in grpo.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [0, 1, 2, 3]


def test_the_embedded_model_is_converted_by_one_process(tmp_path, monkeypatch):
    conversions = []

    def slow_convert(package, tmp):
        conversions.append(tmp)
        time.sleep(0.5)
        os.makedirs(tmp)
        open(os.path.join(tmp, "model.safetensors"), "w").close()
    monkeypatch.setattr(grpo, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(grpo.importlib.util, "find_spec", lambda name: SimpleNamespace(submodule_search_locations=["."]))
    monkeypatch.setattr(grpo, "convert_smollm2", slow_convert)
    found = []
    threads = [threading.Thread(target=lambda: found.append(grpo.resolve_model("smollm2"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(conversions) == 1 and len(set(found)) == 1 and len(found) == 3
    assert os.path.exists(os.path.join(found[0], "model.safetensors"))


def test_sft_targets_get_no_bos_without_a_chat_template(tokenizer, monkeypatch):
    from tokenizers.processors import TemplateProcessing
    plain = copy.deepcopy(tokenizer)  # a Llama-style base tokenizer: no chat template, BOS before every text
    plain.chat_template = None
    plain.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{plain.bos_token} $A", special_tokens=[(plain.bos_token, plain.bos_token_id)])
    assert grpo.encode(plain, "Compute 1 + 1.")[0] == plain.bos_token_id  # a prompt starts with BOS
    seen = []
    monkeypatch.setattr(hl_generator, "sft_step", lambda model, opt, prompts, targets: seen.extend(targets) or 0.0)
    pairs = hl_generator.build_sft_pairs(grpo.load_problems("ops", limit=20))
    cfg = SimpleNamespace(max_context_tokens=64, sft_heldout=0, sft_batch=4, sft_steps=2, seed=0, sft_lr=1e-5)
    hl_generator.sft(make_tiny_model(tokenizer), plain, pairs, cfg, plain.eos_token_id, log=lambda *_: None)
    assert seen and all(t[0] != plain.bos_token_id and t[-1] == plain.eos_token_id for t in seen)


@pytest.mark.parametrize("argv, named", [(["--exp", "1", "--hl", "random"], "--hl random"),
                                         (["--exp", "1", "--hl", "retrieved"], "--hl retrieved"),
                                         (["--hl", "sft", "--context-at", "none"], "--hl sft")])
def test_flags_that_would_do_nothing_are_refused(argv, named):
    with pytest.raises(SystemExit, match=f"^{named} with --context-at none: its contexts go nowhere"):
        grpo.parse_config(alternate.Config, argv)
