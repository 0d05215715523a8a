"""The side-by-side benchmark's --quick mode runs end to end (speed belongs to the benchmark, not to tests)."""

import os
import subprocess
import sys
from pathlib import Path

from _tiny_models import SHARED

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_quick_mode_runs():
    """Workload (b) of bench/throughput.py --quick: lmtune trains, its row has real numbers, and a peer
    whose packages are missing (no `make bench-setup`) is reported as failed instead of crashing."""
    proc = subprocess.run([sys.executable, "bench/throughput.py", "--quick", "--workload", "b"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", "LMTUNE_SHARED_DATA": str(SHARED)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.startswith(("lmtune ", "HF ")) and " / " not in line}  # table rows, not the ratio lines
    ours = rows["lmtune"]
    tok_s, peak_mb, loss = float(ours[1]), float(ours[3]), float(ours[4])
    assert tok_s > 0 and peak_mb > 100 and 0 < loss < 10  # ln(4096) = 8.3 at the start
    assert "MFU" in " ".join(ours)
    assert "HF" in rows or "HF Trainer: failed:" in proc.stdout
