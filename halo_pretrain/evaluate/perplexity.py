"""Perplexity on a prepared split: every token after the first of each shard predicted exactly once.

Each shard's token stream (documents back to back, EOD between) is cut into consecutive windows of
seq_len + 1 tokens that overlap by one, as the trainer packs its samples; the last, shorter window
covers the remainder. The loss is the mean over all predicted tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data.indexed import IndexedDataset
from ..data.manifest import load_manifest
from ..model import HaloSModel


def windows(num_tokens: int, seq_len: int):
    """(start, stop) of windows of at most seq_len + 1 tokens covering num_tokens, overlapping by one."""
    for start in range(0, max(num_tokens - 1, 0), seq_len):
        yield start, min(start + seq_len + 1, num_tokens)


@torch.no_grad()
def perplexity(model: HaloSModel, data_dir, split: str = "validation", seq_len: int | None = None,
               batch_size: int = 8, max_tokens: int | None = None) -> dict:
    """{"loss", "perplexity", "tokens", "windows", "split", "seq_len"} of `model` on a prepared split.

    max_tokens stops after about that many predicted tokens (whole windows), for a quick estimate.
    """
    manifest = load_manifest(data_dir)
    seq_len = seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
    if manifest.vocab_size > model.config.vocab_size:
        raise ValueError(f"{manifest.root}: vocab_size {manifest.vocab_size} (tokenizer {manifest.tokenizer}) "
                         f"is larger than the model's vocab_size={model.config.vocab_size}: wrong data for this model")
    spans, planned = [], 0
    for prefix in manifest.shard_prefixes(split):
        tokens = IndexedDataset(prefix).tokens
        for start, stop in windows(len(tokens), seq_len):
            if max_tokens is not None and planned >= max_tokens:
                break
            spans.append((tokens, start, stop))
            planned += stop - start - 1

    model.eval()
    device = model.embed.weight.device
    total_nll, total_tokens = 0.0, 0
    batch: list[np.ndarray] = []
    for i, (tokens, start, stop) in enumerate(spans):
        batch.append(np.asarray(tokens[start:stop], dtype=np.int64))
        following = spans[i + 1] if i + 1 < len(spans) else None
        # a batch holds windows of one length: a shard's short last window runs on its own
        if len(batch) == batch_size or following is None or following[2] - following[1] != len(batch[0]):
            x = torch.from_numpy(np.stack(batch)).to(device)
            logits = model(x[:, :-1]).float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tokens += x[:, 1:].numel()
            batch = []
    if total_tokens == 0:
        raise ValueError(f"{manifest.root}: split {split!r} has no tokens to predict")
    loss = total_nll / total_tokens
    return {"split": split, "seq_len": seq_len, "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "tokens": total_tokens, "windows": len(spans)}
