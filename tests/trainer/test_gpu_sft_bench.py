"""bench/gpu_sft.py: its FLOPs and peak arithmetic, and its toy size end to end on the CPU (both sides, both configs)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_dev.testing import source_env

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_sft.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_sft_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_flops_per_token_and_peaks():
    bench = load_bench()
    shape = bench.GPU_SHAPE
    attention = 12 * 16 * 2048 * 2048
    assert bench.flops_per_token({"trained": 1000, "frozen": 0}, shape) == 6 * 1000 + attention
    # LoRA: the frozen base does the forward and the activation backward, the adapters all three.
    assert bench.flops_per_token({"trained": 10, "frozen": 1000}, shape) == 4 * 1000 + 6 * 10 + attention
    assert bench.peak_tflops("NVIDIA H200") == 989.0
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("NVIDIA L40S") == 362.0
    assert bench.peak_tflops("NVIDIA L40") == 181.0
    assert bench.peak_tflops("Tesla T4") is None
    assert bench.peak_tflops(None) is None


@pytest.mark.unit
def test_summary_pairs_the_best_runs_and_skips_failed_sides():
    bench = load_bench()

    def run(config, side, rate, mfu=None, **extra):
        return {"config": config, "attn": "sdpa", "side": side, "tokens_per_second_per_gpu": rate, "mfu": mfu, **extra}

    results = [
        run("full", "bare TRL", 100.0, 0.5),
        run("full", "our stage", 90.0, 0.45),
        run("full", "our stage", 95.0, 0.475),
        run("lora", "bare TRL", 0.0, error="OutOfMemoryError: ..."),
        run("lora", "our stage", 80.0),
    ]
    [full] = bench.summarise(results, repeats=2)
    assert full["ratio"] == pytest.approx(0.95)
    assert (full["ours_mfu"], full["bare_mfu"], full["mfu_goal"]) == (0.475, 0.5, 0.45)


@pytest.mark.train
@pytest.mark.slow
def test_toy_run_on_cpu(tmp_path):
    out = tmp_path / "gpu_sft.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--toy", "--json", str(out), "--work-dir", str(tmp_path / "work")],
        env=source_env(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    record = json.loads(out.read_text())
    assert record["toy"] is True and record["device"] == "cpu" and record["peak_tflops"] is None
    assert record["failed_runs"] == 0
    assert [(row["config"], row["attn"]) for row in record["summary"]] == [("full", "sdpa"), ("lora", "sdpa")]
    for row in record["summary"]:
        assert row["ours_tokens_per_second_per_gpu"] > 0 and row["bare_tokens_per_second_per_gpu"] > 0
        assert row["ratio"] > 0
        assert row["ours_mfu"] is None or isinstance(row["ours_mfu"], float)
    assert record["summary"][0]["mfu_goal"] == 0.45
    full, lora = record["parameters"]["full"], record["parameters"]["lora"]
    assert full["frozen"] == 0 and lora["frozen"] == full["trained"] and 0 < lora["trained"] < full["trained"]
    for run in record["runs"]:
        # Warm-up excluded: the timed window is the steps after it, with tokens in every one.
        assert run["steps"] == record["steps"] and run["tokens"] > 0 and run["seconds"] > 0
        assert run["flops_per_token"] > 0
    assert "ratio ours / bare" in result.stdout and "MFU" in result.stdout
