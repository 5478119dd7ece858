"""math_reward.py: R_task, the 0/1 reward for a MATH final answer (README "The method": R_task), and
an example's quality on the built-in ops tasks. How answers are compared: README deviation 13."""

import ast
import math
import operator
import re
from fractions import Fraction

REL_TOL = 1e-10  # relative tolerance for irrational values (rationals compare exactly)
MAX_PARSE_CHARS = 1000  # a longer answer is compared as a string only
MAX_ITEMS = 50  # a longer list/tuple is compared as a string only
MAX_DEPTH = 60  # nesting cap for the parser and for structures inside structures
MAX_POW_BITS = 100_000  # cap on the size of an exact power (9^{9^{9^9}} is refused, not computed)
MAX_WORK_BITS = 1_000_000  # cap on one comparison's exact arithmetic: all operands' bits
POINTS = (0.5, 1.3, -0.7, 2.9, -1.9)  # where expressions with variables are compared

# --- 1. extraction --------------------------------------------------------------------------------


def _brace_group(s, i):
    """Index just past the brace group opening at s[i] ('{'), escapes skipped; -1 if unclosed."""
    depth, k = 0, i
    while k < len(s):
        if s[k] == "\\":
            k += 2
            continue
        depth += (s[k] == "{") - (s[k] == "}")
        if depth == 0:
            return k + 1
        k += 1
    return -1


def extract_boxed(text):
    """The last \\boxed{...}, \\fbox{...} or `\\boxed 5`'s content; None if none or unclosed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox")) if text else -1
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    j = re.compile(r"[ \t\n]*").match(text, i).end()
    if j < len(text) and text[j] == "{":
        end = _brace_group(text, j)
        return text[j + 1 : end - 1].strip() if end > 0 else None
    # `\boxed 5`: up to whitespace or $
    m = re.compile(r"[^\s$]+").match(text, j) if j > i else None
    return m.group(0) if m else None


# --- 2. normalisation (string -> canonical string) ------------------------------------------------


_TEXT_CMDS = re.compile(
    r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname|boldsymbol)\s*\{"
)
_UNIT_WORD = re.compile(r"[A-Za-z]{2,}\.?(\^\{?[23]\}?)?")
_VARIABLE_IS = re.compile(
    r"^(?:[A-Za-z]|\\[a-z]+)(?:_\{?\w+\}?)?\s*(?:=|\\in(?![A-Za-z]))\s*(?=[^=]*$)"
)
_THOUSANDS = re.compile(r"(?<![\d.,])(\d{1,3}(?:,\d{3})+)(?![\d,])")


def _strip_units(s):
    """`5\\text{ cm}` -> `5`, `42 inches` -> `42`, `5.4 \\text{ cents}` -> `5.4`: unit words."""
    first_digit = next((i for i, ch in enumerate(s) if ch.isdigit()), len(s))
    cut = len(s)
    for m in reversed(list(_TEXT_CMDS.finditer(s))):  # trailing \text{words}, last first
        if m.start() >= cut:
            continue  # inside a group already cut
        end = _brace_group(s, m.end() - 1)
        if end < 0 or end > cut:
            break
        inner = s[m.end() : end - 1]
        if not (
            re.fullmatch(r"[A-Za-z .]*", inner)
            and inner.strip()
            and re.fullmatch(r"(\^\{?[23]\}?)?\.?", s[end:cut].strip())
            and first_digit < m.start()
        ):
            break
        cut = m.start()
        while cut > 0 and s[cut - 1].isspace():
            cut -= 1
    s = s[:cut]
    words = s.rstrip(".").split(" ")  # then plain trailing words
    k = len(words)
    while k > 1 and _UNIT_WORD.fullmatch(words[k - 1]):
        k -= 1
    head = "".join(words[:k])
    if k < len(words) and any(ch.isdigit() for ch in head) and not re.search(r"[A-Za-z]", head):
        s = " ".join(words[:k])
    return s


def _unwrap_text(s):
    """`\\text{Evelyn}` -> `Evelyn` (every text-like wrapper, innermost too)."""
    for _ in range(MAX_DEPTH):
        m = _TEXT_CMDS.search(s)
        end = _brace_group(s, m.end() - 1) if m else -1
        if end < 0:
            break
        s = s[: m.start()] + s[m.end() : end - 1] + s[end:]
    return s


def _fix_frac_sqrt(s):
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac{270}7` -> `\\frac{270}{7}`, `\\sqrt13` -> `\\sqrt{13}`,
    `\\sqrt x` -> `\\sqrt{x}`; answers over MAX_PARSE_CHARS are left alone."""
    if len(s) > MAX_PARSE_CHARS:
        return s
    s = re.sub(r"\\sqrt(\d+|[A-Za-z](?![A-Za-z]))", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac(\d)", r"\\frac{\1}", s)  # first argument, one digit
    out, i = [], 0
    while True:  # second argument, one character
        k = s.find("\\frac{", i)
        if k < 0:
            return "".join(out) + s[i:]
        end = _brace_group(s, k + 5)
        if end < 0 or end >= len(s) or not s[end].isalnum():
            out.append(s[i : k + 6])
            i = k + 6
            continue
        out.append(s[i:end] + "{" + s[end] + "}")
        i = end + 1


def normalize_answer(answer):
    """A canonical string form of a final answer: equal forms are equal answers (not conversely)."""
    s = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", str(answer))
    s = s.replace("\n", " ").replace("\t", " ").strip()
    s = re.sub(r"\\(left|right)\s*\.", "", s)  # \left. \right.
    s = re.sub(r"\\(left|right|big|Big|bigg|Bigg)(?![A-Za-z])", "", s)  # \left( -> (
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\displaystyle(?![A-Za-z])", "", s)
    s = s.replace(",\\!", "").replace("{,}", "")  # 10,\!080 and 10{,}080: thousands marks
    s = re.sub(r"(?<!\\)\\[!,:; ]|\\q?quad(?![A-Za-z])|~", " ", s)  # spacing commands
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree", "", s)  # degrees
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(cdot|times)(?![A-Za-z])", "*", s)
    s = re.sub(r"\\div(?![A-Za-z])", "/", s)
    s = _unwrap_text(_strip_units(s.strip())).strip()
    s = _VARIABLE_IS.sub("", s)  # x = 5, x \in [1,2]
    s = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), s)  # 2,220
    s = _fix_frac_sqrt(re.sub(r"\s+", "", s)).rstrip(".")
    for _ in range(3):  # {5} -> 5
        if len(s) >= 2 and s[0] == "{" and _brace_group(s, 0) == len(s):
            s = s[1:-1]
    s = re.sub(r"^\(([A-Z])\)$", r"\1", s)  # (C) -> C
    s = re.sub(r"^(-?\d+)\.0*$", r"\1", s)  # 12.0 -> 12
    s = re.sub(r"^(-?\d*\.\d*?[1-9])0+$", r"\1", s)  # 0.50 -> 0.5
    return re.sub(r"^(-?)\.(\d)", r"\g<1>0.\2", s)  # .5 -> 0.5


# --- 3. values: the answer as Python source, parsed by ast (never run), walked by _evaluate -------


class ParseError(ValueError):
    """Not an answer _evaluate can read: no arithmetic, or too large."""


_TOKEN = re.compile(r"\d+(?:\.\d*)?|\.\d+|\\(?:frac|sqrt|pi|infty)|[A-Za-z]|[-+*/^(){}\[\]]")
_ARGS = {
    "\\frac": ("((", [("{", "}", ")/("), ("{", "}", "))")]),  # \frac{a}{b}    -> ((a)/(b))
    "\\sqrt": ("root((", [("[", "]", "),("), ("{", "}", "))")]),  # \sqrt[n]{x} -> root((n),(x))
}


def _to_python(s):
    """A normalised answer as Python source: ^ -> **, {} -> (), \\frac and \\sqrt as in _ARGS,
    \\pi, \\infty, 0.25 -> (25/100), implicit products explicit; a run of letters: ParseError."""
    out = []
    stack = []  # (closing token, text there, args still wanted)
    want = []  # the brace groups a \frac or \sqrt still takes
    operand = False  # the last token ended an operand: a next operand multiplies
    pos = 0
    for m in _TOKEN.finditer(s):
        tok = m.group(0)
        if m.start() != pos:
            raise ParseError(f"unexpected {s[pos : pos + 10]!r}")
        pos = m.end()
        if tok.isalpha() and pos < len(s) and s[pos].isalpha():
            raise ParseError("a run of letters is text, not a product")
        if want:  # the brace group a \frac or \sqrt takes next (\sqrt's [n] may be left out)
            if want[0][0] == "[" and tok == "{":
                out.append("2),(")
                want = want[1:]
            if tok != want[0][0]:
                raise ParseError(f"expected {want[0][0]!r}, got {tok!r}")
            stack.append((want[0][1], want[0][2], want[1:]))
            want = []
        elif tok in "+-*/^":
            out.append("**" if tok == "^" else tok)
            operand = False
        elif tok in ")}]":
            if not stack or stack[-1][0] != tok:
                raise ParseError(f"unmatched {tok!r}")
            _, text, want = stack.pop()
            out.append(text)
            operand = not want
        else:
            if operand:
                out.append("*")  # implicit multiplication
            operand = tok not in "({[" and tok not in _ARGS
            if tok in _ARGS:
                out.append(_ARGS[tok][0])
                want = _ARGS[tok][1]
            elif tok in "({":
                out.append("(")
                stack.append(({"(": ")", "{": "}"}[tok], ")", []))
            elif tok == "[":
                raise ParseError("unexpected '['")
            elif tok[0].isdigit() or tok[0] == ".":
                out.append(_number(tok))
            else:
                out.append({"\\pi": "pi", "\\infty": "inf"}.get(tok, tok))
        if len(stack) > MAX_DEPTH:
            raise ParseError("nested too deeply")
    if pos != len(s) or stack or want:
        raise ParseError("unexpected end")
    return " ".join(out)


def _number(tok):
    """A decimal as exact Python source: 12 -> 12, 0.25 -> (25/100)."""
    if len(tok) > 100:
        raise ParseError("number too long")
    if "." not in tok:
        return str(int(tok))
    whole, _, frac = tok.partition(".")
    return f"({int(whole + frac or '0')}/{10 ** len(frac)})"


def parse_expression(s):
    """A normalised answer as a Python expression tree (ast), or ParseError; nothing is run."""
    if not s or len(s) > MAX_PARSE_CHARS:
        raise ParseError("empty or too long")
    try:
        return ast.parse(_to_python(s), mode="eval").body
    except (SyntaxError, RecursionError, MemoryError) as e:
        raise ParseError(str(e)) from None


class _Work:
    """The exact arithmetic one is_equiv call may still do, in operand bits (MAX_WORK_BITS)."""

    def __init__(self):
        self.left = MAX_WORK_BITS

    def spend(self, *values):
        exact = [v for v in values if isinstance(v, Fraction)]
        bits = sum(v.numerator.bit_length() + v.denominator.bit_length() for v in exact)
        if bits > self.left:
            raise ParseError("too much exact arithmetic")
        self.left -= bits


def _power(base, exp):
    if isinstance(base, Fraction) and isinstance(exp, Fraction) and exp.denominator == 1:
        base_bits = max(base.numerator.bit_length(), base.denominator.bit_length(), 1)
        if abs(exp) * base_bits > MAX_POW_BITS:
            raise ParseError("power too large")
        return base ** int(exp)
    base, exp = float(base), float(exp)
    if base < 0 and exp != int(exp):
        raise ParseError("complex power")
    return math.pow(base, exp)


def _root(x, n):
    if isinstance(x, Fraction) and n == 2 and x >= 0:
        p, q = math.isqrt(x.numerator), math.isqrt(x.denominator)
        if p * p == x.numerator and q * q == x.denominator:
            return Fraction(p, q)  # \sqrt{4/9} = 2/3 exactly
    x, n = float(x), float(n)
    if x < 0 or n == 0:
        raise ParseError("root of a negative number")
    return x ** (1.0 / n)


_CONSTANTS = {"pi": math.pi, "inf": math.inf}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_OPS.update({ast.Div: operator.truediv, ast.Pow: _power})


def _evaluate(node, env, work):
    """Value of an expression tree, a Fraction while everything is rational, else a float; a node
    that is not arithmetic is a ParseError; each operation is paid from `work` before it runs."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.Name):
        return _CONSTANTS[node.id] if node.id in _CONSTANTS else env[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand, env, work)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "root":
        n, x = [_evaluate(arg, env, work) for arg in node.args]
        work.spend(x, n)
        return _root(x, n)
    if not (isinstance(node, ast.BinOp) and type(node.op) in _OPS):
        raise ParseError(f"not arithmetic: {ast.dump(node)[:40]}")
    a, b = _evaluate(node.left, env, work), _evaluate(node.right, env, work)
    work.spend(a, b)
    if isinstance(node.op, ast.Div) and b == 0:
        raise ParseError("division by zero")
    result = _OPS[type(node.op)](a, b)
    if isinstance(node.op, ast.Pow):
        work.spend(result)
    return result


def _evaluate_or_none(tree, env, work):
    try:
        return _evaluate(tree, env, work)
    except (ParseError, ArithmeticError, ValueError):
        return None


def _variables(tree):
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - {"pi", "inf", "root"}


def _close(a, b):
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    a, b = float(a), float(b)
    if not (math.isfinite(a) and math.isfinite(b)):
        return a == b
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-12)


def _values_equal(a, b, work):
    """Same value: exactly for constants, at POINTS for expressions in the same 1-3 variables."""
    try:
        ta, tb = parse_expression(a), parse_expression(b)
        va, vb = _variables(ta), _variables(tb)
        if va != vb or len(va) > 3:
            return False
        if not va:
            return _close(_evaluate(ta, {}, work), _evaluate(tb, {}, work))
        agree = 0
        for x in POINTS:
            env = {v: Fraction(x) + j for j, v in enumerate(sorted(va))}  # distinct per variable
            ya, yb = _evaluate_or_none(ta, env, work), _evaluate_or_none(tb, env, work)
            if (ya is None) != (yb is None):
                return False  # defined on one side only
            if ya is not None:
                if not _close(ya, yb):
                    return False
                agree += 1
        return agree >= 3
    except (ParseError, ArithmeticError, ValueError, RecursionError):
        return False


# --- 4. structures and the public comparison ------------------------------------------------------


def _split_top(s, sep=","):
    """Split at sep where no bracket is open; (1,2] counts as balanced (intervals mix brackets)."""
    parts = []
    depth = 0
    start = 0
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\" and s.startswith(("\\{", "\\}"), i):
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _enclosed(s):
    """(open, inner, close) if s is one bracketed group like (1,2] or \\{1,2\\}, else None."""
    if s.startswith("\\{") and s.endswith("\\}") and len(s) >= 4:
        return "{", s[2:-2], "}"
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return None
    depth = 0
    for i, c in enumerate(s):
        depth += c in "([{"
        depth -= c in ")]}"
        if depth == 0 and i < len(s) - 1:
            return None  # (1)(2): two groups, not one
    return s[0], s[1:-1], s[-1]


_MATRIX = re.compile(r"\\begin\{([pbBvV]?matrix)\}(.*)\\end\{\1\}")


def _matrix(s):
    m = _MATRIX.fullmatch(s)
    return None if m is None else [r.split("&") for r in m.group(2).split("\\\\") if r != ""]


def _items(s):
    """Elements of a list, with a ± expanded: `1\\pm\\sqrt{5}` -> `1+\\sqrt{5}`, `1-\\sqrt{5}`."""
    out = []
    for part in _split_top(s):
        if part.count("\\pm") == 1:
            out += [part.replace("\\pm", "+"), part.replace("\\pm", "-")]
        else:
            out.append(part)
    return out


def _unordered_equal(xs, ys, depth, work):
    if len(xs) != len(ys):
        return False
    unused = list(ys)
    for x in xs:
        hit = next((k for k, y in enumerate(unused) if _equiv(x, y, work, depth + 1)), None)
        if hit is None:
            return False
        unused.pop(hit)
    return True


def _equiv(a, b, work, depth=0):
    """a, b normalised: strings, then structures, then values; `work` bounds the whole call."""
    if a == b:
        return True
    if not a or not b or depth > MAX_DEPTH or max(len(a), len(b)) > MAX_PARSE_CHARS * 10:
        return False
    ma, mb = _matrix(a), _matrix(b)
    if ma is not None or mb is not None:
        if ma is None or mb is None or [len(r) for r in ma] != [len(r) for r in mb]:
            return False
        return all(_equiv(x, y, work, depth + 1) for ra, rb in zip(ma, mb) for x, y in zip(ra, rb))
    if "\\cup" in a or "\\cup" in b:  # unions of intervals, piece by piece in order
        pa, pb = _split_top(a, "\\cup"), _split_top(b, "\\cup")
        return len(pa) == len(pb) > 1 and all(_equiv(x, y, work, depth + 1) for x, y in zip(pa, pb))
    ea, eb = _enclosed(a), _enclosed(b)
    if ea and eb and ea[0] == eb[0] == "{":  # sets: any order
        xs, ys = _items(ea[1]), _items(eb[1])
        return len(ys) <= MAX_ITEMS and _unordered_equal(xs, ys, depth, work)
    # tuples, intervals
    if ea and eb and (len(_split_top(ea[1])) > 1 or len(_split_top(eb[1])) > 1):
        if (ea[0], ea[2]) != (eb[0], eb[2]):
            return False  # (1,2] != (1,2)
        xs, ys = _split_top(ea[1]), _split_top(eb[1])
        return len(xs) == len(ys) <= MAX_ITEMS and all(
            _equiv(x, y, work, depth + 1) for x, y in zip(xs, ys)
        )
    gold_items = _items(eb[1] if eb and eb[0] == "{" else b)
    if len(gold_items) > 1:  # the gold is a list of solutions: any order
        pred_items = _items(ea[1] if ea and ea[0] == "{" else a)
        return len(gold_items) <= MAX_ITEMS and _unordered_equal(
            pred_items, gold_items, depth, work
        )
    if len(_items(a)) > 1:
        return False  # a list where one value is wanted
    if re.fullmatch(r"[A-Za-z]{2,}", a) and re.fullmatch(r"[A-Za-z]{2,}", b):
        # words: Evelyn == evelyn (single letters stay case-sensitive)
        return a.lower() == b.lower()
    return _values_equal(a, b, work)


def is_equiv(pred, gold):
    """Whether two final answers (strings, e.g. boxed contents) are the same answer."""
    if pred is None or gold is None:
        return False
    return _equiv(normalize_answer(pred), normalize_answer(gold), _Work())


def carries_answer(context, answer):
    """Does a context (x', y') box x's own answer? The leakage beside every accuracy."""
    return context is not None and is_equiv(extract_boxed(context[1]) or "", answer)


def reward(response, gold):
    """R_task(x, y): 1.0 when the last boxed answer of the response equals gold, else 0.0."""
    pred = extract_boxed(response)
    return 1.0 if pred is not None and is_equiv(pred, gold) else 0.0


# --- 5. the built-in ops tasks: their operators, and what makes an example good ----------------

OPS = {  # the made-up operators: the rule an example shows, and its value
    "\\star": ("{a} + {b}", operator.add),
    "\\diamond": ("{a} \\times {b}", operator.mul),
    "\\bullet": ("{a} - {b}", operator.sub),
    "\\heartsuit": ("{b} - {a}", lambda a, b: b - a),
}
_OPS_X = re.compile(r"Compute \$(\d+) (\\[a-z]+) (\d+)\$")  # an ops problem: a, its operator, b


def context_quality(problem, context):
    """On the ops tasks, is the context (x', y') of x's operator (ctx_right_op), and also a right
    example, y' boxing x''s own true value (ctx_good)? None on other problems."""
    op = _OPS_X.search(problem)
    if op is None:
        return {"ctx_right_op": None, "ctx_good": None}
    right_op = context is not None and re.findall(r"\\[a-z]+", context[0])[:1] == [op.group(2)]
    own = _OPS_X.search(context[0]) if right_op else None
    if own is None or own.group(2) != op.group(2):
        return {"ctx_right_op": right_op, "ctx_good": False}
    value = OPS[own.group(2)][1](int(own.group(1)), int(own.group(3)))
    good = carries_answer(context, str(value))
    return {"ctx_right_op": right_op, "ctx_good": good}


def context_quality_rates(problems, contexts):
    """The shares of contexts (a list per problem) with x's operator, and good (context_quality)."""
    flags = [context_quality(p["problem"], c) for p, cs in zip(problems, contexts) for c in cs]
    on_ops = flags and None not in [f["ctx_good"] for f in flags]
    n = len(flags) if on_ops else float("nan")  # NaN: not every problem is an ops one
    return {key: sum(f[key] or 0 for f in flags) / n for key in ("ctx_right_op", "ctx_good")}
