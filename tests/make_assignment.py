"""
A course kit: a copy of the project with chosen equations blanked, graded by tests/test_equations.py.

    python tests/make_assignment.py --list                       # the handout: equation, test, typical mistakes
    python tests/make_assignment.py OUT --blank core             # the method's core equations (CORE below)
    python tests/make_assignment.py OUT --blank k3_kl,hl_reward  # any subset of BLANKABLE

Each chosen function keeps its signature and docstring; its body becomes `raise NotImplementedError(...)` naming the
equation (its README section and formula) and the command that grades it. Every other line is copied as it is, so
the copy runs end to end once the blanks are filled: `cd OUT && python -m pytest -q tests/test_equations.py`.
"""
import argparse
import ast
import os
import shutil
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# name: (file, README "The method" part, the equation, the tests that grade it: pytest -k)
BLANKABLE = {
    "group_advantages": ("grpo.py", 1, "A_i = r_i - mean_j r_j over each problem's G rollouts (--scale-by-std: / std)",
                         "group_advantages or hl_update or icpo_step or learning"),
    "k3_kl": ("grpo.py", 1, "k3 = exp(ref - logp) - (ref - logp) - 1, the per-token KL(p_phi || p_ref)",
              "k3_kl or grpo_loss_kl or grpo_loss_ratio or hl_update_kl or learning"),
    "masked_mean": ("grpo.py", 1, "per-sequence token mean, then the mean over sequences (--loss-norm token: "
                    "sum / (rows * max_len))", "masked_mean or grpo_loss or hl_update_kl or icpo_loss or utilisation or learning"),
    "clipped_surrogate": ("grpo.py", 1, "-min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(logp - old_logp)",
                          "grpo_loss or hl_update_kl or icpo_loss or learning"),
    "grpo_loss": ("grpo.py", 1, "masked_mean of the clipped surrogate + beta_LL k3 per token",
                  "grpo_loss or hl_update_kl or learning"),
    "sequence_logprobs": ("grpo.py", 1, "log p(y_t | x, y_<t) = log softmax(logits / T) at the position before y_t",
                          "sequence_logprobs or generate or hl_update_kl or learning"),
    "sample_next": ("grpo.py", 1, "y_t ~ softmax(logits / T) (T = 0: argmax), and its log-prob log softmax(logits / T)",
                    "generate or hl_step or learning"),
    "utilization_reward": ("context_grpo.py", 3, "U~_i = clip(mean_t [log p_phi(y_t | x, c_i) - log q(y_t | x)], "
                           "-tau', tau')", "utilization_reward or utilisation"),
    "hl_reward": ("hl_generator.py", 4, "R_HL = R_task(x, y) + alpha * (1/|y|) sum_t log p_phi(y_t | x, c)",
                  "hl_reward"),
    "hl_update": ("hl_generator.py", 4, "A_k = R_HL(c_k) - mean_l R_HL(c_l) over x's G_HL contexts; the clipped "
                  "surrogate on the context tokens + beta_HL k3 to pi_SFT", "hl_update"),
    "icpo_loss": ("context_grpo.py", 6, "the clipped surrogate on on-policy rows, -A f(p), f(p) = p / (p + gamma), "
                  "on IEF rows, + beta k3", "icpo_loss"),
    "expert_bonus": ("context_grpo.py", 6, "beta_E (1 - t/T) at step t, 0 from t = T on", "expert_bonus or icpo_step"),
    "errs_merge": ("context_grpo.py", 6, "a right IEF rollout replaces an on-policy row of its own group (at most "
                   "G - 1), a wrong one is dropped", "errs_merge or icpo_step"),
}
CORE = ["group_advantages", "k3_kl", "masked_mean", "clipped_surrogate", "grpo_loss", "utilization_reward",
        "hl_reward", "icpo_loss", "expert_bonus", "errs_merge"]
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache")


def grade_command(name):
    return f"python -m pytest -q tests/test_equations.py -k '{BLANKABLE[name][3]}'"


def body(text, name):
    """(first, last) line numbers (1-based) of the function's body after its docstring."""
    fn = next(n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef) and n.name == name)
    return fn.body[0].end_lineno + 1, fn.end_lineno, fn.body[0].col_offset


def blank(text, name):
    """The module text with `name`'s body replaced by a NotImplementedError naming its equation and its test."""
    first, last, indent = body(text, name)
    _, part, equation, _ = BLANKABLE[name]
    message = f'{name}: README "The method", {part}: {equation}. Graded by: {grade_command(name)}'
    lines = text.splitlines(keepends=True)
    lines[first - 1 : last] = [" " * indent + f"raise NotImplementedError({message!r})\n"]
    return "".join(lines)


def fill(text, reference, name):
    """The module text with `name`'s body taken from the reference text (what a student writes back)."""
    first, last, _ = body(text, name)
    ref_first, ref_last, _ = body(reference, name)
    lines = text.splitlines(keepends=True)
    lines[first - 1 : last] = reference.splitlines(keepends=True)[ref_first - 1 : ref_last]
    return "".join(lines)


def mistakes(name):
    """The typical mistakes (tests/typical_mistakes.py) written inside the function `name`."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from typical_mistakes import M

    found = []
    for mistake, path, old, _ in M:
        text = open(os.path.join(ROOT, path)).read()
        line = text[: text.index(old)].count("\n") + 1
        inside = [n.name for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef)
                  and n.lineno <= line <= n.end_lineno]
        if path == BLANKABLE[name][0] and name in inside:
            found.append(mistake)
    return found


def handout():
    for name, (path, part, equation, _) in BLANKABLE.items():
        print(f"{name} ({path}), README \"The method\", {part}{' (core)' if name in CORE else ''}")
        print(f"    {equation}")
        print(f"    graded by: {grade_command(name)}")
        print(f"    typical mistakes it catches: {'; '.join(mistakes(name)) or '-'}")


def write(out, names):
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"{out} is not empty: pass a new folder")
    shutil.copytree(ROOT, out, ignore=COPY_IGNORE, dirs_exist_ok=True)
    for name in names:
        path = os.path.join(out, BLANKABLE[name][0])
        text = open(path).read()
        open(path, "w").write(blank(text, name))
    print(f"wrote {out}: {len(names)} functions blanked ({', '.join(names)}); grade with "
          f"cd {out} && python -m pytest -q tests/test_equations.py")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("out", nargs="?", help="the folder to write the student copy to")
    p.add_argument("--blank", default="", help="core, or names separated by commas (--list shows them)")
    p.add_argument("--list", action="store_true", help="the handout: each blankable equation, its test, its mistakes")
    args = p.parse_args(argv)
    if args.list:
        return handout()
    names = CORE if args.blank == "core" else [n for n in args.blank.split(",") if n]
    unknown = [n for n in names if n not in BLANKABLE]
    if unknown or not names or not args.out:
        raise SystemExit(f"--blank: unknown {unknown or 'none given'}; blankable: core, {', '.join(BLANKABLE)}"
                         + ("" if args.out else "; and OUT, the folder to write"))
    write(args.out, names)


if __name__ == "__main__":
    main()
