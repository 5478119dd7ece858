"""The GPU check runs on the CPU at toy size, so that it cannot rot before a GPU is lent."""
import json
import os
import subprocess
import sys

import pytest

from conftest import MATH_TRAIN, needs_smollm2

SCRIPT = os.path.join(os.path.dirname(__file__), "gpu_check.py")


@needs_smollm2
@pytest.mark.skipif(not os.path.exists(MATH_TRAIN), reason="../shared/data absent")
def test_gpu_check_at_toy_size(tmp_path):
    assets = tmp_path / "assets"
    subprocess.run([sys.executable, SCRIPT, "--prepare", str(assets)], check=True, capture_output=True)
    proc = subprocess.run([sys.executable, SCRIPT, "--assets", str(assets), "--toy"], cwd=tmp_path, text=True,
                          capture_output=True, timeout=600, env={**os.environ, "OUT": str(tmp_path / "out")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.load(open(tmp_path / "out" / "gpu_check.json"))
    a = result["a_correctness"]
    assert a["greedy_rows_equal_fp32"] == "4/4", "our greedy decoding is not model.generate's"
    assert a["logprob_max_abs_diff"] < 1e-4 and a["kl_policy_vs_its_copy"] == 0.0
    assert all(isinstance(r["ours_tok_s"], float) and isinstance(r["generate_tok_s"], float) for r in result["b_speed"])
    assert [r["update"] for r in result["c_memory"]] == ["LL", "LL", "HL", "HL"]
    d = result["d_round"]
    assert d["eval_problems"] == 4 and len(d["eval_s"]) == 2 and d["ll_step_s"] > 0 and d["sft_step_s"] > 0
    assert "## GPU check on CPU" in proc.stdout
