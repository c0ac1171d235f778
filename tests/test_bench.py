"""`python -m pi05eval.bench` on the CPU with a tiny policy bundle: every engine timed, the JSON written, the actions
checked against eager on the same inputs and noise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from pi05eval.bench import main
from pi05eval.policy.bundle import BundleError


def test_bench_times_each_engine_on_a_bundle_and_writes_json(tiny: Path, tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    argv = ["--bundle", str(tiny), "--engines", "eager", "compile:-compile", "--steps", "2", "--calls", "5"]
    out = main([*argv, "--warmup", "1", "--device", "cpu", "--out", str(path)])
    saved = json.loads(path.read_text())
    assert saved["weights"] == out["weights"] == f"bundle {tiny}"
    eager, fast = saved["results"]
    assert (eager["name"], fast["name"]) == ("eager", "compile:compile=False")
    for r in (eager, fast):
        wall = r["wall_ms"]
        assert wall["n"] == len(r["raw_ms"]) == 5 and 0 < wall["p50"] <= wall["p99"] <= wall["max"]
        assert (r["batch"], r["steps"], r["precision"]) == (1, 2, "bf16")
        assert r["triton_denoise"] is False  # the Triton denoise runs on CUDA only
    assert eager["max_abs_diff"]["eager_bf16"] == 0.0 and eager["speedup_vs_eager"] == 1.0
    assert fast["speedup_vs_eager"] == pytest.approx(eager["wall_ms"]["p50"] / fast["wall_ms"]["p50"])
    # the fast path in bf16: within bf16 rounding of eager bf16, and about as far from fp32 as eager bf16 is
    assert fast["max_abs_diff"]["eager_bf16"] < 5e-2
    assert fast["max_abs_diff"]["eager_fp32"] < 2 * eager["max_abs_diff"]["eager_fp32"] + 1e-2


def test_bench_refuses_a_missing_bundle_before_timing(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    with pytest.raises(BundleError, match="policy bundle directory not found"):
        main(["--bundle", str(tmp_path / "nope"), "--device", "cpu", "--out", str(out)])
    assert not out.exists()


def test_the_bench_command_states_a_bad_engine_option_without_a_traceback() -> None:
    cmd = [sys.executable, "-m", "pi05eval.bench", "--variant", "tiny", "--device", "cpu", "--engines", "compile:nope"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "ValueError: unknown engine option 'nope'" in proc.stderr and "Traceback" not in proc.stderr
