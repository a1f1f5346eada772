"""halo-prep: corpora -> sharded, memory-mapped token binaries (Megatron-LM indexed format)."""

from .prep import PrepConfig, PrepError, run_prep

__all__ = ["PrepConfig", "PrepError", "run_prep"]
