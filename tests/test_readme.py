"""The README's test command is exactly what CI runs, and its first command runs the main job."""
import os
import re
import shlex

import pytest

import alternate
import eval_math500
import grpo

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_ci_runs_the_readme_test_command():
    ci = [l for l in open(os.path.join(ROOT, ".ci", "run")).read().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    readme = open(os.path.join(ROOT, "README.md")).read().splitlines()
    assert ci == [readme[4]]  # the second of the two commands that open the README
    assert readme[3].endswith("&& python alternate.py") and readme[3].split(" && python alternate.py")[0] in ci[0]


def readme_commands():
    """Every `python SCRIPT.py ...` in the README (code blocks and inline), its variables and loop variables filled in
    (a loop variable by its first value)."""
    text = open(os.path.join(ROOT, "README.md")).read().replace("\\\n", " ")
    text = re.sub(r"[ \t]#[^\n]*", "", text)  # shell comments
    variables = dict(re.findall(r'\b([A-Z])="([^"]*)"', text))
    variables.update({name: values.split()[0] for name, values in re.findall(r"for (\w+) in ([^;]+);", text)})

    def expand(s):
        for _ in range(3):  # $F inside $M, ...
            s = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], m[0]), s)
        return s
    for m in re.finditer(r"\bpython3? (\w+\.py)\b([^;&|`#\n]*)", text):
        yield m[1], shlex.split(expand(m[2]).replace("\n", " "))


@pytest.mark.parametrize("script", ["alternate.py", "grpo.py", "eval_math500.py"])
def test_every_readme_command_parses(script):
    """Each command of the README that a newcomer pastes is accepted by today's flags (nothing loads or runs)."""
    module = {"alternate.py": alternate, "grpo.py": grpo, "eval_math500.py": eval_math500}[script]
    seen = 0
    for name, argv in readme_commands():
        if name != script or argv[:1] in (["--report"], ["--plot"]) or "--resume" in argv:
            continue
        try:
            grpo.parse_config(module.Config, argv)
        except SystemExit as e:
            raise AssertionError(f"README: python {script} {' '.join(argv)}: {e}") from None
        seen += 1
    assert seen or script == "grpo.py", f"no {script} command found in the README"
