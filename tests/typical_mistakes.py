"""
The typical mistakes of each equation, tried: each is written into a copy of the repository (in a temporary folder) and
tests/test_equations.py is run on it; the line says which test caught it and with what message.

    python tests/typical_mistakes.py        # ~2 min on 2 CPU cores; every line should read CAUGHT

M lists them as (name, file, the line as written, the line with the mistake); tests/make_assignment.py --list shows
each blankable function's mistakes.
"""
import os, re, shutil, subprocess, sys, tempfile
M = [  # (name, file, old, new)
 ("k3 reversed, KL(p_ref || p)", "grpo.py", "    d = ref_logp - logp\n", "    d = logp - ref_logp\n"),
 ("k1 instead of k3", "grpo.py", "    return d.exp() - d - 1\n", "    return -d\n"),
 ("KL term subtracted", "grpo.py", "    per_token = policy + beta * kl\n", "    per_token = policy - beta * kl\n"),
 ("ratio clipped in log space", "grpo.py", "ratio.clamp(1 - clip_eps, 1 + clip_eps) * A", "(logp - old_logp).clamp(-clip_eps, clip_eps).exp() * A"),
 ("context leaks into the prior's prompt", "context_grpo.py", "[plain[i // cfg.group_size] for i in rows]",
  "[encode(tokenizer, format_prompt(tokenizer, batch[i // cfg.group_size][\"problem\"], contexts[i // cfg.group_size][i % cfg.group_size])) for i in rows]"),
 ("advantages: the batch mean", "grpo.py", "adv = r - r.mean(1, keepdim=True)", "adv = r - r.mean()"),
 ("advantages: the sample std", "grpo.py", "r.std(1, unbiased=False, keepdim=True)", "r.std(1, unbiased=True, keepdim=True)"),
 ("advantage sign flipped", "grpo.py", "adv = r - r.mean(1, keepdim=True)", "adv = r.mean(1, keepdim=True) - r"),
 ("max for min in the surrogate", "grpo.py", "    return -torch.min(unclipped, clipped), ratio\n", "    return -torch.max(unclipped, clipped), ratio\n"),
 ("surrogate maximised (no minus)", "grpo.py", "    return -torch.min(unclipped, clipped), ratio\n", "    return torch.min(unclipped, clipped), ratio\n"),
 ("token norm over the token count", "grpo.py", "return (x * mask).sum() / (mask.shape[0] * (max_len or mask.shape[1]))", "return (x * mask).sum() / mask.sum()"),
 ("seq norm as a token mean", "grpo.py", "return ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()", "return (x * mask).sum() / mask.sum()"),
 ("mask drops the EOS", "grpo.py", "        mask[i, : len(s)] = 1.0\n", "        mask[i, : len(s) - 1] = 1.0\n"),
 ("log-probs without the temperature", "grpo.py", "logits = head(h).float() / temperature", "logits = head(h).float()"),
 ("log-probs shifted by one", "grpo.py", "hidden[:, ids.shape[1] - 1 : -1][keep]", "hidden[:, ids.shape[1] :][keep]"),
 ("utilisation not clipped", "context_grpo.py", "        return u.clamp(-tau, tau)\n", "        return u\n"),
 ("utilisation prior minus context", "context_grpo.py", "d = (logp_ctx - logp_prior) * mask", "d = (logp_prior - logp_ctx) * mask"),
 ("R_HL with the summed log-prob", "hl_generator.py", "confidence = (ll_logprobs * mask).sum(1) / mask.sum(1).clamp(min=1)", "confidence = (ll_logprobs * mask).sum(1)"),
 ("R_HL penalises confidence", "hl_generator.py", "return task_rewards + alpha * confidence", "return task_rewards - alpha * confidence"),
 ("bonus turns negative after T", "context_grpo.py", "beta * max(0.0, 1.0 - step / max(total_steps, 1))", "beta * (1.0 - step / max(total_steps, 1))"),
 ("ERRS accepts wrong rollouts", "context_grpo.py", "if ok and used[b] < group_size - 1", "if used[b] < group_size - 1"),
 ("ICPO shaping with p, not p/(p+gamma)", "context_grpo.py", "shaped = -advantages[:, None] * p / (p + gamma)", "shaped = -advantages[:, None] * p"),
 ("HL advantages over the whole batch", "hl_generator.py", "adv = group_advantages(r_hl, group, cfg.scale_by_std)",
  "adv = group_advantages(r_hl, len(r_hl), cfg.scale_by_std)"),
 ("R_HL averaged over the wrong axis (M > 1)", "hl_generator.py", "r_hl = r_hl_answers.view(-1, M).mean(1)",
  "r_hl = r_hl_answers.view(M, -1).mean(0)"),
 ("ICPO bonus on the on-policy rows", "context_grpo.py", "rewards = sampled.r_task[src] + bonus * is_off.float()",
  "rewards = sampled.r_task[src] + bonus * (~is_off).float()"),
 ("PPO ratio against p_ref, not the sampler", "grpo.py", "policy, ratio = clipped_surrogate(logp, old_logp, advantages, clip_eps)",
  "policy, ratio = clipped_surrogate(logp, old_logp if ref_logp is None else ref_logp, advantages, clip_eps)"),
]
if __name__ == "__main__":
    SRC, DST = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."), os.path.join(tempfile.mkdtemp(), "repo")
    for name, f, old, new in M:
        shutil.rmtree(DST, ignore_errors=True)
        shutil.copytree(SRC, DST, ignore=shutil.ignore_patterns(".venv", ".git", "runs"))
        text = open(os.path.join(DST, f)).read()
        assert text.count(old) == 1, (name, text.count(old))
        open(os.path.join(DST, f), "w").write(text.replace(old, new))
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "--no-header", "-p", "no:warnings", "tests/test_equations.py"],
                           cwd=DST, capture_output=True, text=True)
        failed = re.findall(r"FAILED tests/test_equations.py::(\S+)", p.stdout)
        msg = re.findall(r"^E\s+AssertionError: (.*)$", p.stdout, re.M)
        print(f"{name}: {'CAUGHT by ' + failed[0] if failed else 'NOT CAUGHT'}" + (f" -- {msg[0][:110]}" if msg else ""), flush=True)
