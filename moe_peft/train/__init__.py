"""Training the way users train: TRL's SFTTrainer with router losses (MoESFTTrainer), routing statistics in the
logs (RoutingStatsCallback), user data (load_data), and `moe-peft train CONFIG.yaml` (config.py, run.py)."""

from ..data.user import DataConfig, DataError, UserData, load_data
from .callback import RoutingStatsCallback
from .config import ConfigError, RunConfig, load_config
from .run import TrainRun, stats_from_adapter, train_from_config
from .trainer import MoESFTTrainer, RoutingInputsCollator, routing_columns

__all__ = [
    "ConfigError",
    "DataConfig",
    "DataError",
    "MoESFTTrainer",
    "RoutingInputsCollator",
    "RoutingStatsCallback",
    "RunConfig",
    "TrainRun",
    "UserData",
    "load_config",
    "load_data",
    "routing_columns",
    "stats_from_adapter",
    "train_from_config",
]
