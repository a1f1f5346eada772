"""HaloSForCausalLM: HaloSModel as a transformers PreTrainedModel with GenerationMixin and a KV cache.

The wrapper holds a HaloSModel (`.model`) and adds nothing to its function: logits are HaloSModel's, and
with a cache (what `generate` passes) they come from `HaloSModel.forward_cached`, the same cached
decoding halo-generate runs, over transformers' own DynamicCache.

Padding: HALO-S positions (RoPE and the neighbour set) are a row's own, so a batch of prompts must be
left-padded (`tokenizer.padding_side = "left"`, what `generate` wants anyway); the attention_mask says
where each row starts. Padding after a row's tokens (right padding) is fine for a forward without a
cache (causal attention never reads it); with a cache it is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..model import HaloSModel, KVCache
from .configuration import HaloSConfig

# transformers 5.2x renamed the output's and generate's `past_key_values` to `cache`
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def padding_of(attention_mask: torch.Tensor | None, batch: int, device) -> tuple[torch.Tensor, bool]:
    """(index of each row's first token [B], whether any row has padding after its tokens)."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device), False
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, length] of 0 and 1, got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.to(device=device, dtype=torch.long)
    start = (mask.cumsum(-1) == 0).sum(-1)
    after = mask.flip(-1).cumsum(-1).flip(-1) > 0  # at or before a row's last token
    inside = torch.arange(mask.shape[1], device=device)[None] >= start[:, None]
    if bool(((mask == 0) & inside & after).any()):
        raise ValueError("attention_mask has padding between a row's tokens: HALO-S rows are contiguous; "
                         "pad on the left (tokenizer.padding_side='left') and do not pack rows")
    return start, bool(((mask == 0) & inside).any())


class HaloSForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HaloSConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: HaloSConfig):
        super().__init__(config)
        self.model = HaloSModel(config.halo_config())
        self.post_init()

    def _init_weights(self, module):
        # HaloSModel's own initialization, for the weights a checkpoint did not provide
        if isinstance(module, HaloSModel):
            for name, p in module.named_parameters():
                if not getattr(p, "_is_hf_initialized", False):
                    module.init_parameter(name, p)

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache=None, past_key_values=None, use_cache: bool | None = None, labels: torch.Tensor | None = None,
                logits_to_keep: int = 0, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, return_dict: bool | None = None, **kwargs):
        """input_ids [B, M] -> CausalLMOutputWithPast(loss, logits [B, M, vocab], cache).

        labels follow transformers: the same positions as input_ids (shifted here), -100 ignored.
        """
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("HaloSForCausalLM takes input_ids (inputs_embeds are not supported)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        b, m = input_ids.shape
        start, right_padded = padding_of(attention_mask, b, input_ids.device)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is not None:
            expected = past + torch.arange(m, device=input_ids.device)[None] - start[:, None]
            real = expected >= 0
            if not torch.equal(position_ids.to(expected.device).expand_as(expected)[real], expected[real]):
                raise ValueError("position_ids differ from the positions the attention_mask implies: a HALO-S row's "
                                 "positions count its own tokens from 0 and cannot be set")
        if cache is None and use_cache and not self.training and not right_padded:
            cache = DynamicCache(config=self.config)
        if cache is not None:
            if right_padded:
                raise ValueError("attention_mask pads after a row's tokens, which a cache would keep: "
                                 "pad on the left (tokenizer.padding_side='left')")
            logits = self.model.forward_cached(input_ids, cache, start, logits_to_keep)
        elif bool(start.any()):  # left-padded without a cache: a cache for this call only
            if torch.is_grad_enabled() and self.training:
                raise ValueError("left-padded rows are for inference; train on rows that start at index 0")
            scratch = KVCache(self.model.config, b, m, self.model.embed.weight.dtype, input_ids.device)
            logits = self.model.forward_cached(input_ids, scratch, start, logits_to_keep)
        else:
            logits = self.model(input_ids)
            if 0 < logits_to_keep < m:
                logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            if logits.shape[1] != m:
                raise ValueError("labels need the logits of every position: leave logits_to_keep at 0")
            targets = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
        return out if return_dict is not False else out.to_tuple()
