"""HaloSConfig: a HaloConfig as a transformers configuration (the config.json of an export).

Every HaloConfig field is an attribute of the same name, checked by HaloConfig itself; the names
transformers and its tools look for (num_hidden_layers, max_position_embeddings, ...) map onto them.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from ..config import HaloConfig

HALO_FIELDS = tuple(f.name for f in dataclasses.fields(HaloConfig))


class HaloSConfig(PretrainedConfig):
    model_type = "halo-s"
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                     "num_key_value_heads": "num_kv_heads", "max_position_embeddings": "max_seq_len",
                     "tie_word_embeddings": "tie_embeddings", "hidden_dropout": "dropout"}
    use_cache: bool = True

    # transformers makes every config class (a subclass in an export's configuration_halo.py too) a
    # dataclass whose __init__ hands the keys that are not fields to __post_init__: HaloConfig's are read here
    def __post_init__(self, **kwargs):
        halo = HaloConfig(**{k: kwargs.pop(k) for k in HALO_FIELDS if k in kwargs})  # the checks live there
        for name, value in halo.to_dict().items():
            setattr(self, name, value)
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def halo_config(self) -> HaloConfig:
        return HaloConfig(**{k: getattr(self, k) for k in HALO_FIELDS})
