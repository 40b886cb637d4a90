"""benchmarks/gpu.py --device cpu --tiny runs end to end and writes the figures the GPU visit needs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_cpu_run_writes_every_section(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_cpu-tiny.json").read_text())
    text = (tmp_path / "gpu_cpu-tiny.txt").read_text()
    assert data["device"] == "cpu" and data["tiny"] and data["torch"]
    training = data["sections"]["training"]
    for name in ("configured", "plain float32", "device decode"):
        row = training[name]
        assert row["images_per_second"] > 0 and 0 <= row["data_wait_share"] <= 1, (name, row)
        assert name in text
    assert data["sections"]["features"]["feature pass"]["images_per_second"] > 0
    evaluation = data["sections"]["evaluation"]
    assert evaluation["identical ranks"] is True
    for key in ("recall@1", "recall@10", "recall@100", "map@r"):
        assert evaluation["host"][key] == evaluation["device"][key]
    assert "target is for ResNet-50" in data["verdicts"]["2500 images/s"]  # not judged at toy sizes on the CPU
    assert text.startswith("device: cpu") and "[verdicts]" in text
