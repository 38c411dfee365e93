"""finetune-operator trainer: runs one FineTuneJob stage (CPT, SFT, reward, DPO/KTO/ORPO, PPO, GRPO) locally or on Ray."""
