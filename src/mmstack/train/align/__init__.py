"""Preference alignment recipes for the bridge VLM: reward model, DPO and PPO (one module each).

train_reward(load_config(RewardRecipeConfig, "configs/reward-demo.yaml", ...), out)
train_dpo(load_config(DpoRecipeConfig, "configs/dpo-demo.yaml", ...), out)
train_ppo(load_config(PpoRecipeConfig, "configs/ppo-demo.yaml", ...), out)
"""

from mmstack.train.align.dpo import DpoRecipeConfig, DpoTask, train_dpo
from mmstack.train.align.ppo import PpoRecipeConfig, PpoTask, train_ppo
from mmstack.train.align.reward import RewardRecipeConfig, RewardTask, train_reward

__all__ = [
    "DpoRecipeConfig",
    "DpoTask",
    "PpoRecipeConfig",
    "PpoTask",
    "RewardRecipeConfig",
    "RewardTask",
    "train_dpo",
    "train_ppo",
    "train_reward",
]
