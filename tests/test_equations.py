"""One reference test per equation, named after its function (`pytest -k k3_kl`, `-k grpo_loss`, ...): values computed
by hand, the boundary cases, the direction of each gradient; every assertion says which part of the equation is wrong.
No model is needed but for the log-probs, the utilisation's prior and the learning test (a tiny random model, seconds)."""
import math

import pytest
import torch

import context_grpo as cg
import grpo
import hl_generator as hl
from conftest import make_tiny_model

# -----------------------------------------------------------------------------
# The method, 1: advantages, the k3 KL, the clipped surrogate, the normalisations, log-probs, the sampler


def test_group_advantages_subtract_each_groups_own_mean():
    A = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]), group_size=4)
    assert torch.allclose(A, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75])), \
        "A_i = r_i - mean_j r_j: the mean is over each problem's own G rollouts, not the whole batch"
    assert torch.all(grpo.group_advantages(torch.ones(4), 4) == 0), "equal rewards: every advantage must be 0"


def test_group_advantages_scaled_by_the_population_std():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    A = grpo.group_advantages(r, 4, scale_by_std=True)
    std = math.sqrt(0.75 * 0.25)  # population std (unbiased=False) of 1, 0, 0, 0
    assert A[0].item() == pytest.approx(0.75 / (std + 1e-4)), "--scale-by-std divides by the group's population std + 1e-4"


def test_grpo_loss_ratio_is_to_the_sampling_policy_not_the_reference():
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    far = torch.tensor([[-3.0, -3.0]])  # p_ref far from the policy that sampled
    loss, stats = grpo.grpo_loss(logp, logp.detach(), far, torch.tensor([1.0]), torch.ones(1, 2), clip_eps=0.2, beta=0.0)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, -0.5]])) and stats["clip_frac"] == 0.0, \
        "rho = exp(log p_phi - log p_old), p_old the policy that SAMPLED (not p_ref): at one update rho = 1, nothing clipped"


def test_k3_kl_by_hand():
    value = grpo.k3_kl(torch.tensor(-1.0), torch.tensor(-2.0)).item()  # logp = -1, ref = -2: d = ref - logp = -1
    assert value == pytest.approx(math.exp(-1) - (-1) - 1), \
        f"k3 = exp(ref - logp) - (ref - logp) - 1 = 0.368 at logp -1, ref -2; got {value:.3f} (0.718: the direction " \
        f"is reversed, KL(p_ref || p); 1.0: the k1 estimator logp - ref)"
    assert grpo.k3_kl(torch.tensor(-1.3), torch.tensor(-1.3)).item() == 0.0, "k3 must be 0 when p = p_ref"
    d = torch.linspace(-3, 3, 13)
    assert torch.all(grpo.k3_kl(torch.zeros(13), d) >= 0), "k3 is never negative"


def test_grpo_loss_gradient_at_ratio_one_is_minus_advantage():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    A = torch.tensor([2.0, -1.0])
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, A, torch.ones(2, 2))
    loss.backward()
    assert torch.allclose(logp.grad, -A[:, None] / 2 / 2), \
        "at rho = 1, d loss / d logp_t = -A_i / (tokens) / (rows): the surrogate is minimised, so a positive " \
        "advantage must raise log p (a sign error or max for min changes this)"


@pytest.mark.parametrize("ratio, A, inside", [(1.19, 1.0, True), (1.21, 1.0, False), (0.81, -1.0, True),
                                              (0.79, -1.0, False), (0.7, 1.0, True), (1.3, -1.0, True)])
def test_grpo_loss_clips_the_ratio_to_one_plus_minus_eps(ratio, A, inside):
    old = torch.tensor([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_()
    loss, stats = grpo.grpo_loss(logp, old, None, torch.tensor([A]), torch.ones(1, 1), clip_eps=0.2)
    loss.backward()
    grad = logp.grad.item()
    if inside:  # the unclipped term is the min: its gradient -A rho flows
        assert grad == pytest.approx(-A * ratio, rel=1e-5), \
            f"rho = {ratio}, A = {A}: min(rho A, clip(rho, 0.8, 1.2) A) is rho A here, its gradient must flow " \
            f"(clipping the log-ratio to [-eps, eps] instead of rho to [1 - eps, 1 + eps] stops it at 0.81)"
    else:
        assert grad == 0.0, f"rho = {ratio}, A = {A}: beyond 1 +- eps on the side A pushes, the clipped term is the " \
                            f"min and carries no gradient (rho must be clipped to [0.8, 1.2], not log rho to [-0.2, 0.2])"
    assert stats["clip_frac"] == (0.0 if abs(ratio - 1) <= 0.2 else 1.0), "clip_frac counts |rho - 1| > eps"


def test_grpo_loss_kl_term_pulls_log_p_toward_the_reference():
    logp = torch.tensor([[-1.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, -2.0]])
    loss, stats = grpo.grpo_loss(logp, logp.detach(), ref, torch.zeros(1), torch.ones(1, 2), beta=0.5)
    loss.backward()
    assert logp.grad[0, 0] > 0 and logp.grad[0, 1] < 0, \
        "+ beta * k3: a gradient step must move log p toward log p_ref (down where above it, up where below); " \
        "the KL term was subtracted, or its direction reversed"
    expected = 0.5 * (1 - torch.exp(ref - logp.detach())) / 2  # d/dlogp of beta k3, then the token mean
    assert torch.allclose(logp.grad, expected), "the KL term is beta * k3 per token, averaged like the surrogate"
    assert stats["kl"] == pytest.approx(grpo.k3_kl(logp.detach(), ref).mean().item()), "the logged kl is the mean k3"


def test_masked_mean_both_normalisations():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert grpo.masked_mean(x, mask, "seq").item() == pytest.approx((2.0 + 4.0) / 2), \
        "seq: the mean over each sequence's own tokens, then over sequences (padding never counts)"
    assert grpo.masked_mean(x, mask, "token", max_len=5).item() == pytest.approx(10.0 / (2 * 5)), \
        "token (Dr. GRPO): the token sum over rows x max_new_tokens, a constant, not over the number of tokens"

# -----------------------------------------------------------------------------
# the sampler's log-probs at temperature T, the completion mask


def test_pad_completions_mask_keeps_the_eos_and_nothing_after():
    ids, mask = grpo.pad_completions([[5, 6, 2], [7]])
    assert ids.tolist() == [[5, 6, 2], [7, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]], "the mask covers every completion token including its EOS, 0 after"


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
def test_sequence_logprobs_are_log_softmax_of_logits_over_temperature(tiny_model, tokenizer, T):
    prompt, completion = [[1, 2, 3, 4]], [[5, 6, 7]]
    with torch.no_grad():
        logp, mask = grpo.sequence_logprobs(tiny_model, prompt, completion, temperature=T)
        logits = tiny_model(torch.tensor([[1, 2, 3, 4, 5, 6, 7]])).logits[0, 3:6]  # the positions before y_1..y_3
        ref = (logits / T).log_softmax(-1).gather(-1, torch.tensor([[5], [6], [7]])).squeeze(-1)
    assert torch.allclose(logp[0], ref, atol=1e-5), \
        "log p(y_t | x, y_<t) = log softmax(logits / T) at the position BEFORE y_t (a shift by one, or a missing / T)"


def test_generate_logprobs_are_those_of_the_sampled_tokens(tiny_model, tokenizer):
    rows = [[1, 2, 3, 4]] * 3
    tokens, logps = grpo.generate(tiny_model, rows, 6, temperature=0.7, seed=0)
    with torch.no_grad():
        again, mask = grpo.sequence_logprobs(tiny_model, rows, tokens, temperature=0.7)
    assert torch.allclose(grpo.pad_completions(logps, value=0.0)[0] * mask, again * mask, atol=1e-4), \
        "the sampler's log-prob of each token is log softmax(logits / T) of the token it sampled"

# -----------------------------------------------------------------------------
# The method, 3: the utilisation reward, and what the prior must not see


def test_utilization_reward_by_hand():
    lp_c = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    lp_q = torch.tensor([[-2.0, -2.5, 0.0], [-0.1, -0.1, -0.1]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    u = cg.utilization_reward(lp_c, lp_q, mask, tau=10.0)
    assert torch.allclose(u, torch.tensor([0.75, -0.4])), \
        "U = mean over y's tokens of log p(y_t | x, c) - log q(y_t | x): context minus prior, padding excluded"
    assert torch.allclose(cg.utilization_reward(lp_c, lp_q, mask, tau=0.5), torch.tensor([0.5, -0.4])), \
        "U~ is clipped to [-tau', tau'], on both sides"
    assert torch.allclose(cg.utilization_reward(lp_c, lp_q, mask, 10.0, "sum"), torch.tensor([1.5, -1.2])), \
        "--util-reduce sum: the sequence log-ratio"


def test_utilisation_scores_the_prior_on_x_without_the_context(tokenizer, monkeypatch):
    batch = [{"problem": "What is 2 + 3?", "answer": "5"}]
    contexts = [[("What is 1 + 1?", "$\\boxed{2}$"), None]]
    seen = []

    def spy(model, prompt_ids, completion_ids, temperature=1.0):
        seen.extend(map(tuple, prompt_ids))
        return torch.zeros(len(prompt_ids), 2), torch.ones(len(prompt_ids), 2)

    monkeypatch.setattr(cg, "sequence_logprobs", spy)
    cfg = type("C", (), {"group_size": 2, "temperature": 1.0, "tau": 1.0, "util_reduce": "mean"})
    u, _ = cg.utilisation(object(), tokenizer, batch, contexts, [[5, 6], [5, 6]], [[-1.0, -1.0], [-1.0, -1.0]], cfg)
    plain = tuple(grpo.encode(tokenizer, grpo.format_prompt(tokenizer, batch[0]["problem"])))
    assert seen == [plain], "q(y | x) is scored on x WITHOUT the context (the context leaked into the prior's prompt)"
    assert u[1].item() == 0.0, "a rollout without a context gets no utilisation"

# -----------------------------------------------------------------------------
# The method, 4: R_HL, the HL's advantages and KL to pi_SFT; 6: ICPO's bonus, ERRS, the shaping


def test_hl_reward_by_hand():
    logp = torch.tensor([[-1.0, -3.0, 0.0], [-0.5, -0.5, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    r = hl.hl_reward(torch.tensor([1.0, 0.0]), logp, mask, alpha=0.1)
    assert torch.allclose(r, torch.tensor([1.0 + 0.1 * -2.0, 0.1 * -1.0])), \
        "R_HL = R_task + alpha * (1/|y|) sum_t log p(y_t | x, c): the per-token MEAN log-prob, added (confidence)"


def test_hl_update_kl_is_to_pi_sft_and_off_at_beta_hl_zero(tokenizer):
    prompts, comps, r_hl = [[1, 2, 3]] * 2, [[5, 6], [7, 8, 9]], torch.tensor([1.0, 0.0])
    cfg = type("C", (), {"beta_hl": 0.5, "scale_by_std": False, "max_context_tokens": 4, "hl_temperature": 1.0,
                         "updates": 1, "micro_batch": 0, "clip_eps": 0.2, "loss_norm": "seq", "grad_clip": 1.0})
    hl_model, sft_model = make_tiny_model(tokenizer, seed=1), grpo.frozen_copy(make_tiny_model(tokenizer, seed=2))
    with torch.no_grad():
        (lp, mask), (lp_sft, _) = (grpo.sequence_logprobs(m, prompts, comps) for m in (hl_model, sft_model))
    stats = hl.hl_update(hl_model, sft_model, torch.optim.SGD(hl_model.parameters(), lr=0.0), prompts, comps, r_hl, cfg, 2)
    assert stats["kl"] == pytest.approx(((grpo.k3_kl(lp, lp_sft) * mask).sum() / mask.sum()).item(), rel=1e-4), \
        "the HL's KL is k3 of pi_theta against the frozen pi_SFT, on the context tokens"
    cfg.beta_hl = 0.0
    assert hl.hl_update(hl_model, sft_model, torch.optim.SGD(hl_model.parameters(), lr=0.0), prompts, comps, r_hl, cfg,
                        2)["kl"] == 0.0, "--beta-hl 0: no KL to pi_SFT at all"


def test_hl_update_advantages_are_over_each_problems_own_contexts(monkeypatch):
    seen = []
    monkeypatch.setattr(grpo, "policy_update", lambda model, ref, opt, prompts, comps, adv, *a, **k: seen.append(adv) or {})
    cfg = type("C", (), {"beta_hl": 0.0, "scale_by_std": False, "max_context_tokens": 4, "hl_temperature": 1.0})
    r_hl = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])  # 2 problems x G_HL = 4 contexts
    hl.hl_update(None, None, None, [[1]] * 8, [[2]] * 8, r_hl, cfg, 4)
    assert torch.allclose(seen[0], torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75])), \
        "A_k = R_HL(c_k) - mean_l R_HL(c_l) over x's OWN G_HL contexts, not over the whole batch"


def test_hl_step_averages_r_hl_over_each_contexts_m_answers(tokenizer, monkeypatch):
    """The LL answers x with each of its G_HL contexts M times, in that order; R_HL of a context is the mean over its M."""
    hl_model, ll_model = make_tiny_model(tokenizer, seed=4), make_tiny_model(tokenizer, seed=5)
    problems = [{"problem": "What is 1 + 1?", "answer": "2"}, {"problem": "What is 2 + 2?", "answer": "4"}]
    c1, c2 = ("What is 3 + 3?", "$\\boxed{6}$"), ("What is 5 + 1?", "$\\boxed{6}$")
    real_contexts, real_generate, ll_prompts, r_hl = hl.generate_contexts, grpo.generate, [], []

    def contexts(model, tok, batch, n, *a, **k):  # the HL writes c1 and c2 for each x
        _, prompts, completions, stats = real_contexts(model, tok, batch, n, *a, **k)
        return [[c1, c2] for _ in batch], prompts, completions, stats

    def generate(model, prompts, *a, **k):
        if model is ll_model:
            ll_prompts.extend(prompts)
        return real_generate(model, prompts, *a, **k)

    monkeypatch.setattr(hl, "generate_contexts", contexts)
    monkeypatch.setattr(grpo, "generate", generate)
    monkeypatch.setattr(hl, "hl_reward", lambda r, *a: torch.arange(8.0))  # R_HL per LL answer: 0, 1, ..., 7
    monkeypatch.setattr(hl, "hl_update", lambda *a: r_hl.append(a[5]) or {})
    cfg = type("C", (), {"hl_group": 2, "ll_answers": 2, "max_context_tokens": 8, "max_new_tokens": 4, "seed": 0,
                         "temperature": 1.0, "hl_temperature": 1.0, "hl_ll_temperature": -1, "self_threshold": 0.9,
                         "alpha": 0.1})
    hl.hl_step(hl_model, None, ll_model, None, tokenizer, problems, cfg, 0, [2])
    expected = [grpo.encode(tokenizer, grpo.format_prompt(tokenizer, p["problem"], c)) for p in problems
                for c in (c1, c2) for _ in range(2)]
    assert ll_prompts == expected, "the LL answers each context M times, in the order of the contexts"
    assert r_hl[0].tolist() == [0.5, 2.5, 4.5, 6.5], "R_HL(c) = the mean over c's own M answers (the right axis)"


def test_icpo_step_bonus_goes_to_the_accepted_ief_rows(tokenizer, monkeypatch):
    def rollouts(model, tok, problems, contexts, cfg, eos, seed):  # 3 on-policy rows, then 1 IEF row (right)
        n = sum(map(len, contexts))
        return grpo.Rollouts([[1]] * n, [[2]] * n, [[-1.0]] * n, torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.zeros(n))

    seen = []
    monkeypatch.setattr(grpo, "rollouts", rollouts)
    monkeypatch.setattr(grpo, "ll_update", lambda model, ref, opt, roll, adv, *a: seen.append(adv) or {})
    cfg = type("C", (), {"group_size": 3, "seed": 0, "delta": 1.0, "icpo_bonus": 0.5, "bonus_steps": 10})
    batch = [{"problem": "What is 1 + 1?", "answer": "2"}]
    cg.icpo_step(None, None, None, tokenizer, batch, [[("What is 2 + 2?", "$\\boxed{4}$")]], cfg, 0, [2])
    want = grpo.group_advantages(torch.tensor([0.0, 1.0, 1.0 + 0.5]), 3, scale_by_std=True)  # IEF row replaced row 2
    assert torch.allclose(seen[0], want), \
        "ICPO: the expert bonus beta_E (1 - t/T) goes to the accepted IEF rows only, then (r - mean) / std"


def test_expert_bonus_anneals_linearly_to_zero():
    assert [cg.expert_bonus(0.5, t, 4) for t in range(6)] == pytest.approx([0.5, 0.375, 0.25, 0.125, 0.0, 0.0]), \
        "beta_E * (1 - t/T) for t = 0..T-1, and never negative after T"


def test_errs_merge_keeps_only_correct_rollouts_of_their_own_group():
    replace, rejected = cg.errs_merge([0, 0, 1, 1], [True, False, True, True], n_problems=2, group_size=4)
    assert replace == {3: 0, 7: 2, 6: 3} and rejected == 1, \
        "ERRS: a correct IEF rollout replaces the last on-policy rows of ITS OWN group; a wrong one is dropped"
    assert cg.errs_merge([0, 0, 0], [True] * 3, 1, 3)[0] == {2: 0, 1: 1}, "one on-policy rollout always stays"


def test_icpo_loss_shaping_term_on_off_policy_rows():
    logp = torch.tensor([[-0.5, -2.0]], requires_grad=True)
    loss, _ = cg.icpo_loss(logp, logp.detach(), None, torch.tensor([1.0]), torch.ones(1, 2), torch.tensor([True]),
                           0.2, 0.0, gamma=0.1)
    loss.backward()
    p = logp.detach().exp()
    assert torch.allclose(logp.grad, -0.1 * p / (p + 0.1) ** 2 / 2), \
        "IEF rows: -A f(p), f(p) = p / (p + gamma), unclipped; d/dlogp = -A gamma p / (p + gamma)^2"

# -----------------------------------------------------------------------------
# the pieces pointing the right way: a tiny model learns a reward in seconds


def _tiny(vocab=16, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, initializer_range=0.5)).eval()


def test_grpo_learning_raises_the_reward_and_the_kl_pulls_back():
    """GRPO steps on "the first token is 5" (about 1/16 at the start) must raise the reward; a KL-only update must
    pull a moved policy back toward its reference. A flipped advantage or KL sign fails here."""
    model = _tiny()
    ref = grpo.frozen_copy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    cfg = type("C", (), {"updates": 1, "micro_batch": 0, "clip_eps": 0.2, "loss_norm": "seq", "grad_clip": 1.0})
    prompts, target, first = [[1, 2, 3]] * 16, 5, []
    for step in range(30):
        tokens, _ = grpo.generate(model, prompts, 2, 1.0, seed=step)
        r = torch.tensor([float(t[0] == target) for t in tokens])
        first.append(r.mean().item())
        grpo.policy_update(model, None, opt, prompts, tokens, grpo.group_advantages(r, 16), cfg, 0.0, 2, 1.0)
    assert sum(first[-5:]) / 5 > 0.5 > sum(first[:5]) / 5, \
        f"the reward must rise from ~1/16 under GRPO (advantage or loss sign?): {first[:5]} -> {first[-5:]}"
    tokens, _ = grpo.generate(model, prompts, 2, 1.0, seed=99)
    kl = lambda: grpo.k3_kl(*(grpo.sequence_logprobs(m, prompts, tokens)[0] for m in (model, ref))).mean().item()  # noqa
    with torch.no_grad():
        before = kl()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # fresh: no momentum from the GRPO steps
    for _ in range(20):
        grpo.policy_update(model, ref, opt, prompts, tokens, torch.zeros(16), cfg, 1.0, 2, 1.0)
    with torch.no_grad():
        assert kl() < 0.5 * before, f"with A = 0 the beta * k3 term alone must pull the policy back toward p_ref " \
                                    f"(KL sign?): KL {before:.3f} -> {kl():.3f}"
