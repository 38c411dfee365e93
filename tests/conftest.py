"""Suite-wide settings: CPU DeepSpeed, no telemetry, tests see only the local machine."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Tiny models gain nothing from intra-op threads; on 2 cores extra threads only contend with each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
