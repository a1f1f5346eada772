"""halo-pretrain: pretrain HALO-S sparse-attention language models with DeepSpeed."""

from .config import HaloConfig, get_preset, PRESETS

__version__ = "0.1.0"
__all__ = ["HaloConfig", "get_preset", "PRESETS", "__version__"]
