"""Training the way users train: TRL's SFTTrainer with router losses (MoESFTTrainer), routing statistics in the
logs (RoutingStatsCallback), user data (load_data), and `moe-peft train CONFIG.yaml` (config.py, run.py)."""

from .callback import RoutingStatsCallback
from .trainer import MoESFTTrainer, RoutingInputsCollator, routing_columns

__all__ = ["MoESFTTrainer", "RoutingInputsCollator", "RoutingStatsCallback", "routing_columns"]
