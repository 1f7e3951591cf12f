"""Restructuring keeps training bit for bit: a few fixed-seed steps of SFT (dropout, accumulation,
evaluation, checkpoints), AdaLoRA and DPO on a tiny Q8_0 model give the same adapter file, checkpoint
files and metrics lines (timings left out) as the commit that recorded tests/golden_runs.json.

Hashes depend on the CPU's kernels, so they are kept per CPU feature set (golden_run.cpu_class); a CPU
class nobody recorded is skipped, saying so. Record with `PYTHONPATH=src python tests/golden_run.py
--record` on a commit whose behaviour is the reference."""

from __future__ import annotations

import json

import pytest
from golden_run import GOLDEN_FILE, cpu_class, run_all


def test_training_is_bitwise_what_it_was(tmp_path):
    golden = json.loads(GOLDEN_FILE.read_text()).get(cpu_class())
    if golden is None:
        pytest.skip(f"no golden run recorded for this CPU class ({cpu_class()})")
    got = run_all(tmp_path)
    differ = {f"{run}/{key}": (golden[run].get(key), value)
              for run, hashes in got.items() for key, value in hashes.items() if golden[run].get(key) != value}
    missing = {f"{run}/{key}" for run, hashes in golden.items() for key in hashes if key not in got.get(run, {})}
    assert not differ and not missing, f"changed (recorded, now): {differ}; missing: {sorted(missing)}"
