"""tools/bench_memory.py: the estimates it prints are the ones train would act on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "bench_memory.py"


def test_estimates_alone_are_printed_without_training():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cases", "124M,xl", "--steps", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == {"124M", "xl"}
    for line in rows.values():
        assert line.endswith("(estimate only)")
    # gpt2-xl's full fine-tune is its weights, gradients and AdamW's moments alone: 16 bytes a parameter
    assert 16 * 1.5576e9 / 1e9 < float(rows["xl"].split()[6]) < 40


def test_negative_steps_are_a_one_line_error():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--steps", "-1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--steps must be 0" in proc.stderr.strip().splitlines()[-1]
