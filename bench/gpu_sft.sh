#!/usr/bin/env bash
# bench/gpu_sft.py in one go on a GPU machine with a copy of this repository and a Python environment that has its
# trainer dependencies (torch with CUDA, transformers, trl, peft, datasets, tokenizers, pydantic); no network, no Ray.
#
#   bench/gpu_sft.sh [gpu_sft.py options, e.g. --steps 30 --gradient-checkpointing]
#
# PYTHON picks the interpreter (default: .venv/bin/python, else python3). Results go to $OUT (when set) or
# bench/results/: gpu_sft-<time>.json (for recording in docs/benchmarks.md) and gpu_sft-<time>.log. The run is cut at
# GPU_SFT_TIMEOUT seconds (default 540; the default sizes should take about 5 minutes on one H200).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
python=${PYTHON:-}
if [[ -z $python ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH="$repo/api:$repo/trainer${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}

out=${OUT:-$repo/bench/results}
mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" - <<'EOF'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "trl", "peft", "datasets", "tokenizers", "pydantic")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages: {', '.join(missing)}")
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"flash-attn {'yes' if importlib.util.find_spec('flash_attn') else 'no'}")
EOF

timeout "${GPU_SFT_TIMEOUT:-540}" "$python" bench/gpu_sft.py --json "$out/gpu_sft-$stamp.json" "$@" \
  2>&1 | tee "$out/gpu_sft-$stamp.log"
