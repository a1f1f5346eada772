"""AdamW with the usual parameter groups, and a step that can be skipped (non-finite loss)."""

from __future__ import annotations

import torch
import torch.nn as nn

NO_DECAY_SUFFIXES = ("global_k", "global_v")  # learned global key/value slots


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: no decay on norms, biases, embeddings and the global slots."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or id(p) in embeddings or name.endswith(NO_DECAY_SUFFIXES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next step() does nothing when `skip_next` is set: weights and moments stay as they are.

    DeepSpeed calls this optimizer's step() at every ZeRO stage (it wraps the instance, it does not
    copy it), so setting the flag before engine.step() skips the update everywhere.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_next = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> SkippableAdamW:
    return SkippableAdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
