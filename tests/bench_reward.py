"""
Benchmark: our grader (math_reward.reward) against HuggingFace's math-verify on a labelled case set.

The case set is built from the 500 MATH-500 gold answers by rewrites whose label is known by
construction, never by asking a grader: an equivalent rewrite (label 1: \\dfrac for \\frac, an exact
decimal, `x =`, units, thousands separators, a reordered list of solutions, ...) or a near-miss
(label 0: a changed digit, a flipped sign, a rounded decimal, a swapped tuple, a changed bracket, ...).
Each answer is placed in a realistic response ("... so the answer is $\\boxed{...}$.").

math-verify is not a project dependency; run this in a scratch environment that has it:

    python -m venv /tmp/mv && /tmp/mv/bin/pip install "math-verify[antlr4_13_2]"
    /tmp/mv/bin/python tests/bench_reward.py            # both graders
    python tests/bench_reward.py                         # ours only, when math-verify is absent
"""
import json
import os
import random
import re
import sys
import time
from fractions import Fraction

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from math_reward import reward  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "math500.jsonl")
TEMPLATES = [
    "Let me work through this step by step.\n\nAfter simplifying, we get the result.\n\nTherefore, the final answer is $\\boxed{%s}$.",
    "We compute carefully and check the result.\n\nThe answer is \\boxed{%s}",
    "**Solution.** Combining the two cases gives\n\\[\n\\boxed{%s}\n\\]",
    "Putting it together: $\\boxed{%s}$. I hope it is correct.",
]

INT = re.compile(r"^-?\d+$")
FRAC = re.compile(r"^(-?)\\frac\{(\d+)\}\{(\d+)\}$")
TUPLE = re.compile(r"^\((-?\d+),\s*(-?\d+)\)$")


def variants(gold):
    """(answer, label) pairs made from one gold answer; label 1 = same answer, 0 = a different one."""
    g = gold.strip()
    out = [(g, 1)]
    if "\\frac" in g:
        out.append((g.replace("\\frac", "\\dfrac"), 1))
    if "," not in g and "=" not in g and "\\text" not in g and "matrix" not in g:
        out.append(("x = " + g, 1))
    if "\\sqrt{" in g:
        out.append((re.sub(r"\\sqrt\{(\d)\}", r"\\sqrt \1", g), 1))
    if g.endswith("^\\circ"):
        out.append((g[:-6], 1))
        out.append((g.replace("^\\circ", "^{\\circ}"), 1))
    m = re.fullmatch(r"\\text\{([A-Za-z]+)\}", g)
    if m:
        out.append((m.group(1), 1))
        out.append(("\\text{" + m.group(1)[::-1] + "}", 0) if m.group(1) != m.group(1)[::-1] else (g, 1))
    if INT.match(g):
        n = int(g)
        out.append((f"{n}.0", 1))
        out.append((f"{n} \\text{{ units}}", 1))
        out.append((str(n + 1), 0))
        if n != 0:
            out.append((str(-n), 0))
        if abs(n) >= 1000:
            out.append((f"{n:,}", 1))
            out.append((f"{n:,}".replace(",", "{,}"), 1))
        out.append((f"\\frac{{{2 * n}}}{{2}}", 1))
    m = FRAC.match(g)
    if m:
        sign, a, b = m.group(1), int(m.group(2)), int(m.group(3))
        v = Fraction(a, b) * (-1 if sign else 1)
        out.append((f"{sign}{a}/{b}", 1))
        out.append((f"{sign}\\frac{{{2 * a}}}{{{2 * b}}}", 1))
        out.append((f"{sign}\\frac{{{b}}}{{{a}}}", 1 if a == b else 0))
        out.append((f"{'' if sign else '-'}\\frac{{{a}}}{{{b}}}", 0))
        den = b // (2 ** _mult(b, 2)) // (5 ** _mult(b, 5))
        if den == 1:  # terminating decimal: exact
            out.append((str(float(v)), 1))
        else:  # rounded decimal: not the answer
            out.append((f"{float(v):.3f}", 0))
    m = TUPLE.match(g)
    if m:
        a, b = m.group(1), m.group(2)
        out.append((f"\\left( {a}, {b} \\right)", 1))
        out.append((f"({b}, {a})", 1 if a == b else 0))
        out.append((f"[{a}, {b}]", 0))
    if re.fullmatch(r"[\(\[][^,]+,[^,]+[\)\]]", g) and ("\\infty" in g or g[0] != g[-1]):  # an interval
        flipped = ("[" if g[0] == "(" else "(") + g[1:]
        out.append((flipped, 0))
    if re.fullmatch(r"-?\d+(,\s*-?\d+)+", g) and not re.fullmatch(r"\d{1,3}(,\d{3})+", g):  # a list of solutions
        items = [s.strip() for s in g.split(",")]
        out.append((", ".join(reversed(items)), 1))
        out.append((", ".join(items[:-1]), 0))
    if re.search(r"\d", g) and not INT.match(g):  # a changed digit somewhere else: a different answer
        last = [mm for mm in re.finditer(r"\d", g)][-1]
        d = str((int(last.group(0)) + 1) % 10)
        changed = g[:last.start()] + d + g[last.end():]
        if re.sub(r"\d", "", changed) == re.sub(r"\d", "", g) and not re.search(r"\^\{?\d", g):
            out.append((changed, 0))
    return out


def _mult(n, p):
    k = 0
    while n % p == 0:
        n //= p
        k += 1
    return k


def build_cases():
    rows = [json.loads(line) for line in open(DATA, encoding="utf-8")]
    rng = random.Random(0)
    cases = []
    for r in rows:
        for ans, label in variants(r["answer"]):
            cases.append((rng.choice(TEMPLATES) % ans, r["answer"], label))
    return cases


def run(name, grade, cases):
    start = time.perf_counter()
    verdicts = [grade(resp, gold) for resp, gold, _ in cases]
    seconds = time.perf_counter() - start
    correct = sum(int(v) == label for v, (_, _, label) in zip(verdicts, cases))
    fp = sum(int(v) == 1 and label == 0 for v, (_, _, label) in zip(verdicts, cases))
    fn = sum(int(v) == 0 and label == 1 for v, (_, _, label) in zip(verdicts, cases))
    us = 1e6 * seconds / len(cases)
    print(f"{name:12} accuracy {correct / len(cases):.4f} ({correct}/{len(cases)})  "
          f"false accepts {fp:4d}  false rejects {fn:4d}  {us:8.1f} us/call")
    return verdicts, us


def main():
    cases = build_cases()
    pos = sum(label for _, _, label in cases)
    print(f"{len(cases)} labelled responses from 500 MATH-500 golds ({pos} equivalent, {len(cases) - pos} near-misses)")
    ours, us_ours = run("math_reward", reward, cases)
    try:
        from math_verify import parse, verify
    except ImportError:
        print("math-verify is not installed here: see this file's docstring for the scratch environment")
        return

    def math_verify(response, gold):
        return verify(parse("$" + gold + "$"), parse(response))

    theirs, us_theirs = run("math-verify", math_verify, cases)
    print(f"speed ratio: math_reward is {us_theirs / us_ours:.0f}x faster per call")
    for who, verdicts in (("math_reward", ours), ("math-verify", theirs)):
        for (resp, gold, label), v in zip(cases, verdicts):
            if int(v) != label:
                print(f"  {who} wrong: label {label}, gold {gold!r}, response box {resp.split('boxed')[-1][:50]!r}")


if __name__ == "__main__":
    main()
