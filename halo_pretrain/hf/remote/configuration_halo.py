"""HALO-S configuration for `trust_remote_code=True`. Needs halo-pretrain installed: pip install halo-pretrain[hf].

The implementation is halo_pretrain.hf.configuration; this file only names it for transformers.
"""

from halo_pretrain.hf.configuration import HaloSConfig as _HaloSConfig


class HaloSConfig(_HaloSConfig):
    pass
