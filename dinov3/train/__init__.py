"""DINOv3 self-supervised training: config, data, heads, losses, the SSL architecture and the training loop."""

from .config import BUILTIN, DEFAULTS, backbone_kwargs, load_config
from .trainer import Trainer, TrainingStopped, train

__all__ = ["BUILTIN", "DEFAULTS", "Trainer", "TrainingStopped", "backbone_kwargs", "load_config", "train"]
