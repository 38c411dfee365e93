"""Ray start-up overhead per stage: time to the first training step, Ray Train (2 workers) vs one plain process.

    DS_ACCELERATOR=cpu .venv/bin/python bench/ray_overhead.py [--steps 10]

Runs the stage entrypoint (`python -m finetune_trainer.stage`, exactly what `finetune run` and the operator run) on a
tiny SFT stage and timestamps its output: process start -> first progress line -> exit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"


def stage_config(model_dir: Path, out: Path, workers: int, steps: int) -> str:
    from finetune_api.render import render_stage
    from finetune_api.spec import FineTuneJobSpec

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"source": str(model_dir)},
            "storage": {"uri": str(out)},
            "peft": {"method": "full"},
            "resources": {"workers": workers},
            "training": {
                "maxSteps": steps,
                "batchSize": 16,
                "maxLength": 64,
                "loggingSteps": 1,
                "saveSteps": steps * 10,
            },
            "stages": [{"name": "sft", "type": "sft", "dataset": {"uri": str(DATA / "instruct.jsonl")}}],
        }
    )
    return render_stage("bench", spec, "sft").model_dump_json()


def timed_stage(config_json: str, report: Path, use_ray: bool) -> tuple[float, float]:
    """(seconds to the first step line, total seconds)."""
    command = [
        sys.executable,
        "-u",
        "-m",
        "finetune_trainer.stage",
        "--config-json",
        config_json,
        "--report",
        f"file://{report}",
    ]
    if not use_ray:
        command.append("--no-ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.perf_counter()
    first_step = None
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            if first_step is None and "[sft] step " in line:
                first_step = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"stage failed ({process.returncode})")
    return first_step or float("nan"), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    from finetune_trainer.tiny_model import write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    model_dir = write_tiny_model(work / "tiny", DATA)
    results = {}
    for label, workers, use_ray in (("plain process, 1 worker", 1, False), ("Ray Train, 2 workers", 2, True)):
        config = stage_config(model_dir, work / label.split(",")[0].replace(" ", "-"), workers, args.steps)
        results[label] = timed_stage(config, work / f"{workers}.json", use_ray)
        print(
            f"{label:26s} first step after {results[label][0]:6.1f}s, finished after {results[label][1]:6.1f}s",
            flush=True,
        )
    plain, ray = results["plain process, 1 worker"], results["Ray Train, 2 workers"]
    print(f"Ray overhead to first step: {ray[0] - plain[0]:.1f}s; end to end: {ray[1] - plain[1]:.1f}s per stage")


if __name__ == "__main__":
    main()
