"""``benchmarks/gpu_check.py`` in its CPU mode (``--cpu-smoke``), so the GPU check keeps working between GPU runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke_writes_a_complete_report(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("DIFFREG_TEST_DEVICE", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    reports = list(tmp_path.glob("cpu-smoke_*.md"))
    assert len(reports) == 1 and not list(tmp_path.glob("gpu_*.md"))  # a CPU run never poses as a GPU report
    text = reports[0].read_text()
    for heading in ("## Hardware", "## Unit tests", "## Training the profiles", "## Resuming"):
        assert heading in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    methods = [ln.split("|")[1].strip() for ln in rows]
    assert methods == ["voxelmorph", "voxelmorph", "voxelmorph-diff", "diffusemorph", "fsdiffreg", "diffusereg",
                       "diffusereg", "ldm-morph", "drdm"]
    assert all("failed" not in ln for ln in rows)
    assert "2 passed" in text and "killed with SIGKILL" in text and "every step passed" in text
