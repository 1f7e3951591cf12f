"""Random sequences of the public API never crash the process and stay consistent.

The state machine lives in stateful_api.py and runs in a child process: a segfault or a ggml abort
there fails this test with its signal instead of killing pytest. CI runs 500 sequences (about a
minute); GGML_LORA_STATEFUL_EXAMPLES=20000 is the long run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_random_api_sequences_do_not_crash(tiny_model_file):
    n = int(os.environ.get("GGML_LORA_STATEFUL_EXAMPLES", "500"))
    path = tiny_model_file("llama", "q8_0")
    proc = subprocess.run([sys.executable, str(HERE / "stateful_api.py"), str(path), str(n)],
                          capture_output=True, text=True, timeout=3600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"exit {proc.returncode} (negative: killed by that signal)\n{tail}"
    assert f"stateful: {n} sequences passed" in proc.stdout, tail
