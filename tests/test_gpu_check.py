"""The GPU acceptance script (bench/gpu_check.py) runs every check end to end on tiny configs on the CPU, so the
script a GPU session runs is known to work before a GPU is lent."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_check_on_tiny_models(tmp_path):
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, "gpu_check.py", "--device", "cpu", "--tiny", "--json", str(out)],
                         cwd=ROOT / "bench", capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    results = {r["check"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"bf16", "same_seed", "batch_of_4", "offload_model", "offload_sequential", "fp16",
                            "lora_train_step", "lcm_train_step"}
    assert all(r["ok"] for r in results.values())
    assert results["same_seed"]["total_s"] > 0 and results["batch_of_4"]["image0_max_diff"] < 0.05
    assert "8 passed, 0 failed" in run.stdout
