"""The README's test command is exactly what CI runs, and its first command runs the main job."""
import os

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_ci_runs_the_readme_test_command():
    ci = [l for l in open(os.path.join(ROOT, ".ci", "run")).read().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    readme = open(os.path.join(ROOT, "README.md")).read().splitlines()
    assert ci == [readme[4]]  # the second of the two commands that open the README
    assert readme[3].endswith("&& python alternate.py") and readme[3].split(" && python alternate.py")[0] in ci[0]
