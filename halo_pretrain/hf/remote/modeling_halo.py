"""HALO-S model for `trust_remote_code=True`. Needs halo-pretrain installed: pip install halo-pretrain[hf].

The implementation is halo_pretrain.hf.modeling (HaloSModel and its cached decoding); this file only
names it for transformers.
"""

from halo_pretrain.hf.modeling import HaloSForCausalLM as _HaloSForCausalLM

from .configuration_halo import HaloSConfig


class HaloSForCausalLM(_HaloSForCausalLM):
    config_class = HaloSConfig
