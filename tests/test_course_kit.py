"""Tests for tests/make_assignment.py: a blanked copy fails exactly its equations' tests with messages naming them,
filling the reference bodies back restores every file, the learning test grades a student's loss, the handout."""
import os
import re
import subprocess
import sys

import pytest

import make_assignment as kit

ROOT = os.path.join(os.path.dirname(__file__), "..")


def equation_tests(folder, k=None):
    """(failed test names, selected test names, the output) of tests/test_equations.py in `folder`."""
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-p", "no:cacheprovider",
            "tests/test_equations.py"] + (["-k", k] if k else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(args, cwd=folder, capture_output=True, text=True, env=env, timeout=600)
    failed = {re.sub(r"\[.*", "", f) for f in re.findall(r"FAILED tests/test_equations.py::(\S+)", run.stdout)}
    return failed, run


def selected(folder, k):
    args = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "tests/test_equations.py",
            "-k", k]
    out = subprocess.run(args, cwd=folder, capture_output=True, text=True, timeout=300).stdout
    return {re.sub(r"\[.*", "", line.split("::")[1]) for line in out.splitlines() if "::" in line}


def test_a_blanked_copy_fails_exactly_the_tests_of_its_blanks_each_naming_its_equation(tmp_path):
    names = ["k3_kl", "hl_reward", "errs_merge"]
    kit.main([str(tmp_path / "hw"), "--blank", ",".join(names)])
    failed, run = equation_tests(tmp_path / "hw")
    want = set().union(*(selected(tmp_path / "hw", kit.BLANKABLE[n][3]) for n in names))
    assert failed == want, run.stdout[-3000:]
    for n in names:  # each failure says which equation to write and how it is graded
        _, part, equation, k = kit.BLANKABLE[n]
        assert f'NotImplementedError: {n}: README "The method", {part}: {equation}. Graded by' in run.stdout, n
    counts = re.search(r"(\d+) failed, (\d+) passed in", run.stdout)
    collected = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                                "tests/test_equations.py"], cwd=tmp_path / "hw", capture_output=True, text=True)
    n_tests = sum("::" in line for line in collected.stdout.splitlines())
    assert counts and int(counts.group(1)) + int(counts.group(2)) == n_tests, run.stdout[-500:]  # the rest pass


def test_the_core_preset_blanks_only_function_bodies_and_filling_them_back_restores_every_file(tmp_path):
    kit.main([str(tmp_path / "hw"), "--blank", "core"])
    for name in kit.CORE:
        path = kit.BLANKABLE[name][0]
        student = open(tmp_path / "hw" / path).read()
        reference = open(os.path.join(ROOT, path)).read()
        assert "raise NotImplementedError" in student and student != reference
        for other in kit.CORE:  # the student writes every blank of this file back
            if kit.BLANKABLE[other][0] == path:
                student = kit.fill(student, reference, other)
        assert student == reference, f"{path}: blanking touched more than the bodies of {kit.CORE}"
    for path in ("alternate.py", "eval_math500.py", "math_reward.py", "tests/test_equations.py", "README.md"):
        assert open(tmp_path / "hw" / path).read() == open(os.path.join(ROOT, path)).read(), path


def test_the_learning_test_fails_on_a_blank_loss_and_passes_on_the_reference(tmp_path):
    kit.main([str(tmp_path / "hw"), "--blank", "grpo_loss"])
    failed, run = equation_tests(tmp_path / "hw", k="learning")
    assert failed == {"test_grpo_learning_raises_the_reward_and_the_kl_pulls_back"}, run.stdout[-2000:]
    path = tmp_path / "hw" / "grpo.py"
    path.write_text(kit.fill(path.read_text(), open(os.path.join(ROOT, "grpo.py")).read(), "grpo_loss"))
    failed, run = equation_tests(tmp_path / "hw", k="learning")
    assert not failed and "1 passed" in run.stdout, run.stdout[-2000:]


def test_an_unknown_name_is_refused_with_the_list(tmp_path):
    with pytest.raises(SystemExit, match="unknown \\['k4_kl'\\]; blankable: core, group_advantages, k3_kl"):
        kit.main([str(tmp_path / "hw"), "--blank", "k3_kl,k4_kl"])
    assert not (tmp_path / "hw").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(SystemExit, match="not empty"):
        kit.main([str(tmp_path / "used"), "--blank", "k3_kl"])


def test_the_handout_lists_each_equation_its_test_and_its_typical_mistakes(capsys):
    kit.main(["--list"])
    out = capsys.readouterr().out
    for name, (path, part, equation, k) in kit.BLANKABLE.items():
        assert f'{name} ({path}), README "The method", {part}' in out and equation in out and k in out, name
    grpo_loss = out[out.index("grpo_loss (grpo.py)"):out.index("sequence_logprobs (grpo.py)")]
    assert "PPO ratio against p_ref, not the sampler" in grpo_loss and "KL term subtracted" in grpo_loss
