"""Our PPO implementation (TRL no longer ships one), used by the `ppo` recipe; see docs/ppo.md.

core.py     tensor arithmetic: masks, KL estimators, per-token rewards, GAE, whitening, clipped losses
kl.py       fixed/adaptive KL coefficient and running reward statistics
models.py   per-token scorer over a sequence classifier (value and reward), reference policy, tokenizer comparison
rollout.py  prompt encoding, sampling, scoring (re-tokenizing for a reward model with its own tokenizer)
engines.py  optimizer + schedule around a model: plain PyTorch or a DeepSpeed engine (ZeRO 0-3)
loop.py     the PPO step loop, its statistics, KL gate, checkpoints and resume
"""
