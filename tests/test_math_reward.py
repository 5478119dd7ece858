"""Tests for math_reward.py: the MATH-500 reference solutions, a case table, hostile inputs."""
import json
import os
import time

import pytest

from math_reward import extract_boxed, is_equiv, normalize_answer, reward

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
MATH500 = os.path.join(DATA, "math500.jsonl")

# -----------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize("text, expected", [
    ("the answer is \\boxed{5}.", "5"),
    ("\\boxed{1} then \\boxed{2}", "2"),                       # the last box
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                  # nested braces
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),                        # escaped braces do not close the box
    ("\\fbox{7}", "7"),
    ("\\boxed{3} and \\fbox{4}", "4"),
    ("so it is $\\boxed 9$.", "9"),                             # brace-less form
    ("\\boxed {12}", "12"),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("no box here", None),
    ("", None),
    ("\\boxed{unclosed", None),                                 # a cut-off response
    ("\\boxed", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# -----------------------------------------------------------------------------
# the case table: (pred, gold, expected); every pair is checked both ways

CASES = [
    # fractions: \dfrac, \tfrac, \frac12, a/b
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True), ("\\tfrac{1}{2}", "\\frac12", True), ("\\frac12", "1/2", True),
    ("\\frac{3}{4}", "3/4", True), ("\\frac{270}7", "\\frac{270}{7}", True), ("-\\frac{2}{3}", "\\frac{-2}{3}", True),
    ("\\frac{4}{8}", "\\frac12", True), ("\\frac{1}{2}", "\\frac{1}{3}", False), ("\\frac{2}{3}", "\\frac{3}{2}", False),
    ("\\dfrac{7}{2}", "3.5", True), ("1/2", "2/1", False), ("\\frac{1}{2}", "-\\frac12", False),
    # exact decimals equal, rounded ones do not
    ("0.5", "\\frac{1}{2}", True), (".5", "\\frac12", True), ("0.50", "1/2", True), ("0.25", "\\frac14", True),
    ("0.33", "\\frac{1}{3}", False), ("0.333", "1/3", False), ("0.3333333333", "\\frac13", False),
    ("0.67", "\\frac{2}{3}", False), ("3.14", "\\pi", False), ("3.1416", "\\pi", False), ("1.41", "\\sqrt{2}", False),
    ("0.125", "\\frac{1}{8}", True), ("2.5", "\\frac52", True), ("-0.75", "-\\frac{3}{4}", True),
    # numerically identical forms
    ("3\\sqrt{13}", "\\sqrt{117}", True), ("2\\sqrt{2}", "\\sqrt{8}", True), ("\\sqrt{12}", "2\\sqrt{3}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", True), ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),
    ("3\\sqrt{13}", "\\sqrt{116}", False), ("2\\sqrt{3}", "3\\sqrt{2}", False), ("\\sqrt{4}", "2", True),
    ("2^{10}", "1024", True), ("2^{-1}", "0.5", True), ("10^3", "1000", True), ("(-2)^3", "-8", True),
    ("\\sqrt[3]{8}", "2", True), ("4\\cdot 5", "20", True), ("3\\times 4", "12", True), ("12\\div 4", "3", True),
    ("\\frac{1+\\sqrt{5}}{2}", "\\frac{\\sqrt5+1}{2}", True), ("\\frac{1-\\sqrt{5}}{2}", "\\frac{1+\\sqrt5}{2}", False),
    # \sqrt without braces
    ("\\sqrt13", "\\sqrt{13}", True), ("\\sqrt 2", "\\sqrt{2}", True), ("5\\sqrt2", "5\\sqrt{2}", True),
    ("\\sqrt13", "\\sqrt{14}", False),
    # integers: thousands separators, trailing .0, signs
    ("2,220", "2220", True), ("2{,}220", "2220", True), ("10,\\!080", "10080", True), ("1,000,000", "1000000", True),
    ("12.0", "12", True), ("12.00", "12", True), ("-3", "-3.0", True), ("12", "13", False), ("2,220", "2,221", False),
    ("100", "1000", False), ("-5", "5", False), ("007", "7", True), ("+5", "5", True),
    # assignments
    ("x = 5", "5", True), ("y=3", "3", True), ("k = \\frac{1}{2}", "0.5", True), ("x=4", "5", False),
    ("a = -2", "-2", True), ("n = 10", "10", True), ("x \\in [-2, 7]", "[-2,7]", True),
    # units and words after a number
    ("5\\text{ cm}", "5", True), ("42 inches", "42", True), ("5.4 \\text{ cents}", "5.4", True),
    ("12 \\text{ square feet}", "12", True), ("6\\text{ cm}^2", "6", True), ("9 \\mbox{ units}", "9", True),
    ("\\frac{270}{7}\\text{ degrees}", "\\frac{270}7", True), ("5\\text{ cm}", "6", False), ("42 inches", "24", False),
    ("20 dollars", "20", True), ("3 hours", "3", True),
    # degrees, percent, dollars
    ("90^\\circ", "90", True), ("90^{\\circ}", "90", True), ("30^\\circ", "30^{\\circ}", True), ("45^\\circ", "30", False),
    ("50\\%", "50", True), ("12.5\\%", "12.5", True), ("50\\%", "5", False), ("\\$18.90", "18.90", True),
    ("\\$36", "36", True), ("\\$32,\\!348", "32348", True), ("\\$18.90", "18.9", True), ("\\$36", "63", False),
    # \left/\right and spacing
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True), ("3\\!\\cdot\\!4", "12", True),
    ("1\\,000", "1000", True), ("\\left[ 1, 2 \\right]", "[1,2]", True), ("2~\\text{cm}", "2", True),
    ("\\displaystyle\\frac{1}{2}", "0.5", True), ("\\left(1, 2\\right)", "(2, 1)", False),
    # \pi
    ("2\\pi", "\\pi \\cdot 2", True), ("\\frac{\\pi}{2}", "\\frac12\\pi", True), ("\\pi", "3.14159", False),
    ("4\\pi", "2\\pi", False), ("\\pi r^2", "r^2\\pi", True), ("6.28", "2\\pi", False),
    # tuples and intervals: order and brackets matter
    ("(1,2)", "(1, 2)", True), ("(1,2)", "(2,1)", False), ("(1,2]", "(1,2)", False), ("[1,2)", "(1,2)", False),
    ("[1,2]", "[1, 2]", True), ("(-\\infty, 0]", "(-\\infty,0]", True), ("(5,\\infty)", "(5, \\infty)", True),
    ("(2,\\infty)", "[2,\\infty)", False), ("(\\frac{3}{2}, -13)", "\\left( \\frac{3}{2}, -13 \\right)", True),
    ("(1.5, -13)", "(\\frac32,-13)", True), ("(6,31,-1)", "(6,31,-1)", True), ("(6,31,-1)", "(6,-1,31)", False),
    ("(1,2,3)", "(1,2)", False), ("(-\\sqrt{3}, \\sqrt{3})", "(-\\sqrt3,\\sqrt3)", True),
    ("(0,9) \\cup (9,36)", "(0, 9)\\cup(9, 36)", True), ("(0,9) \\cup (9,36)", "(0,9) \\cup [9,36)", False),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty,2)\\cup(3,\\infty)", True), ("(0,9)", "(0,9)\\cup(9,36)", False),
    ("(3,4]", "(3, 4]", True), ("(1,2)", "1,2", False),
    # unordered lists of solutions
    ("1, -2", "-2, 1", True), ("-2,1", "1,-2", True), ("3, 5, 7", "7, 3, 5", True), ("1, 2", "1, 3", False),
    ("1, 2, 3", "1, 2", False), ("1", "1, -2", False), ("\\frac12, 2", "2, 0.5", True), ("1, 1", "1, 2", False),
    ("\\{1\\pm\\sqrt{5},-2\\}", "-2, 1+\\sqrt5, 1-\\sqrt5", True), ("1\\pm\\sqrt{5}", "1-\\sqrt5, 1+\\sqrt5", True),
    ("\\{1, 2\\}", "\\{2, 1\\}", True), ("\\{1, 2\\}", "\\{1, 3\\}", False), ("\\{1,2\\}", "2, 1", True),
    # text answers
    ("\\text{Evelyn}", "Evelyn", True), ("Evelyn", "\\text{Evelyn}", True), ("\\text{east}", "east", True),
    ("\\text{Navin}", "\\text{Evelyn}", False), ("\\textbf{even}", "\\text{even}", True), ("\\text{even}", "odd", False),
    ("\\text{(C)}", "C", True), ("(C)", "\\text{(C)}", True), ("\\text{(B)}", "\\text{(C)}", False),
    ("\\text{ellipse}", "ellipse", True), ("evelyn", "Evelyn", True),
    # matrices and vectors
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{bmatrix}1\\\\2\\end{bmatrix}", True),
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}", "\\begin{pmatrix} -\\frac13 \\\\ \\frac{2}{3} \\end{pmatrix}", True),
    ("\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", "\\begin{pmatrix}-1&0\\\\0&-1\\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", False),
    ("\\begin{pmatrix} 1 & 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
    ("\\begin{pmatrix} 0.5 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} \\frac12 \\\\ 2 \\end{pmatrix}", True),
    ("(1, 2)", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
    # expressions in one variable, by value
    ("2x+2", "2(x+1)", True), ("x^2-1", "(x-1)(x+1)", True), ("x^2+2x+1", "(x+1)^2", True),
    ("2x+2", "2x+1", False), ("x^2", "x^3", False), ("\\frac{x}{2}", "0.5x", True), ("3x", "3y", False),
    ("\\frac{1}{x}", "x^{-1}", True), ("(a+b)^2", "a^2+2a\\cdot b+b^2", True), ("ab", "ba", False), ("(a+b)^2", "a^2+b^2", False),
    ("y = 2x + 3", "2x+3", True), ("4x^2", "(2x)^2", True), ("\\sqrt{x^2}", "x", False),
    # nothing equals an empty answer
    ("", "5", False), ("5", "", False), ("   ", "0", False),
]


def test_case_table_size():
    assert len(CASES) >= 150


@pytest.mark.parametrize("pred, gold, expected", CASES)
def test_case_table(pred, gold, expected):
    assert is_equiv(pred, gold) is expected
    assert is_equiv(gold, pred) is expected  # both ways


def test_normalize_is_idempotent():
    for pred, gold, _ in CASES:
        for s in (pred, gold):
            once = normalize_answer(s)
            assert normalize_answer(once) == once, s


def test_reward():
    assert reward("We get $x = \\boxed{\\dfrac{1}{2}}$.", "0.5") == 1.0
    assert reward("We get $\\boxed{3}$.", "0.5") == 0.0
    assert reward("The answer is 0.5", "0.5") == 0.0  # no box, no reward
    assert reward("", "0.5") == 0.0
    assert reward("\\boxed{1} wait, \\boxed{2}", "2") == 1.0  # the last box counts
    assert isinstance(reward("\\boxed{2}", "2"), float)


# -----------------------------------------------------------------------------
# the 500 MATH-500 reference solutions


@pytest.mark.skipif(not os.path.exists(MATH500), reason=f"{MATH500} not found (CI has ../shared/data)")
def test_math500_reference_solutions_get_full_reward():
    rows = [json.loads(line) for line in open(MATH500, encoding="utf-8")]
    assert len(rows) == 500
    wrong = [r["unique_id"] for r in rows if reward(r["solution"], r["answer"]) != 1.0]
    assert wrong == []


# -----------------------------------------------------------------------------
# hostile inputs: every call returns, quickly, with no exception

HOSTILE = [
    "\\boxed{" + "1" * 100_000 + "}",
    "x" * 100_000 + "\\boxed{5}",
    "\\boxed{" + "{" * 5000 + "5" + "}" * 5000 + "}",
    "\\boxed{" + "(" * 5000 + "5" + ")" * 5000 + "}",
    "\\boxed{" + "-" * 5000 + "5}",
    "\\boxed{" + "\\sqrt{" * 3000 + "2" + "}" * 3000 + "}",
    "\\boxed{" + "{" * 5000 + "5",
    "\\boxed{}}}}{{{",
    "\\boxed{5\x00}\x00\x00",
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{10^{100000}}",
    "\\boxed{(10^{4000})^{4000}}",
    "\\boxed{2^{2^{2^{2^{2^{2}}}}}}",
    "\\boxed{\\input{/etc/passwd}}",
    "\\boxed{__import__('os').system('echo pwned')}",
    "\\boxed{" + ", ".join(str(i) for i in range(20_000)) + "}",
    "\\boxed{" + "\\text{" * 2000 + "a" + "}" * 2000 + "}",
    "\\boxed{" + "x=" * 5000 + "1}",
    "\\boxed{" + " " * 50_000 + "5 " + "cm " * 10_000 + "}",
    "\\boxed{" + "\\frac" * 5000 + "}",
    "\\boxed{" + "1/" * 20_000 + "1}",
    "\\boxed{" + "\\begin{pmatrix}" + "1&" * 5000 + "1\\end{pmatrix}}",
    "\\boxed{0.1^{-100000}}",
    "\\boxed{1e308*10}",
]
PRIMES = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 101, 103]
CAPPED = [f"1/{p}^{{{100_000 // p.bit_length()}}}" for p in PRIMES * 3]  # each power just under MAX_POW_BITS
HEAVY = ["+".join(CAPPED[:60]),                                             # a sum of many capped powers (was 240 s)
         "\\frac{" + "+".join(CAPPED[:12]) + "}{" + "+".join(CAPPED[:12]) + "+1}",  # a ratio of two sums (13 s)
         "x^{2}+" + "+".join(CAPPED[:40]),                                  # the same at five points (94 s)
         "5\\text{cm}" + "\\text{cm}" * 16_000]                            # a long run of unit words (60 s, quadratic)
HOSTILE += ["\\boxed{" + h + "}" for h in HEAVY]


@pytest.mark.parametrize("response", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_input_is_bounded(response):
    for gold in ("5", "1, 2", "(1,2)", "x+1", response[7:-1]):
        start = time.perf_counter()
        r = reward(response, gold)
        assert r in (0.0, 1.0)
        normalize_answer(response)
        assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("answer", HEAVY, ids=range(len(HEAVY)))
def test_heavy_arithmetic_is_bounded_in_total(answer):
    start = time.perf_counter()
    is_equiv(answer, answer + "+0")  # not the same string: the evaluator runs, within its work budget
    assert time.perf_counter() - start < 2.0


def test_hostile_text_is_only_text():
    assert reward("\\boxed{__import__('os').system('echo pwned')}", "0") == 0.0
    assert reward("\\boxed{\\input{/etc/passwd}}", "0") == 0.0
    assert is_equiv("9^{9^{9^{9}}}", "9^{9^{9^{9}}}")  # equal strings, never evaluated
    assert not is_equiv("9^{9^{9^{9}}}", "1")


def quality(x, c):
    from math_reward import context_quality
    q = context_quality(x, c)
    return q["ctx_right_op"], q["ctx_good"]


def test_context_quality_is_x_s_operator_and_then_a_right_example():
    from math_reward import OPS, context_quality_rates
    x = "Compute $3 \\star 5$."
    right = ("Compute $2 \\star 7$.", "$2 \\star 7 = 2 + 7 = 9$, so $\\boxed{9}$.")
    assert quality(x, right) == (True, True)
    assert quality(x, ("Compute $2 \\star 7$.", "$\\boxed{14}$")) == (True, False)  # x's operator, a wrong solution
    assert quality(x, ("Compute $2 \\star 7$.", "no box")) == (True, False)
    assert quality(x, ("Compute $3 \\diamond 5$.", "$\\boxed{15}$")) == (False, False)  # right, another operator
    assert quality(x, ("Compute $3 \\times 5$.", "$\\boxed{15}$")) == (False, False)  # not a made-up operator
    assert quality(x, ("Find $3 \\star 5 + 1$.", "$\\boxed{9}$")) == (True, False)  # x's operator, not an ops example
    assert quality(x, None) == (False, False) and quality(x, ("What is 3 + 5?", "8")) == (False, False)
    assert quality("What is 3 + 5?", right) == (None, None)  # not an ops problem: no such number
    for op, (rule, value) in OPS.items():  # each operator's true value: b - a for \\heartsuit
        example = (f"Compute $9 {op} 4$.", f"$\\boxed{{{value(9, 4)}}}$")
        assert quality(f"Compute $1 {op} 2$.", example) == (True, True)
        assert quality(f"Compute $1 {op} 2$.", (example[0], f"$\\boxed{{{value(4, 9) + 1}}}$")) == (True, False)
    assert OPS["\\heartsuit"][1](9, 4) == -5
    wrong_value = ("Compute $2 \\star 7$.", "$\\boxed{14}$")
    rates = context_quality_rates([{"problem": x}], [[right, wrong_value, None, right]])
    assert rates == {"ctx_right_op": 0.75, "ctx_good": 0.5}
    rates = context_quality_rates([{"problem": x}, {"problem": "What is 3 + 5?"}], [[right], [right]])
    assert all(v != v for v in rates.values())  # NaN: not every problem is an ops one
