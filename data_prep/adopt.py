"""``halo-prep adopt``: a manifest for shards that Megatron-LM or GPT-NeoX already made."""

from __future__ import annotations

import json
import os
from pathlib import Path

from halo_pretrain.data.indexed import IndexedDataset
from halo_pretrain.data.manifest import MANIFEST_NAME, Manifest, ShardEntry
from halo_pretrain.data.tokenizer import get_tokenizer

from .prep import TOOL_VERSION, PrepError
from .verify import file_sha256
from .writer import write_atomic


def adopt(data_dir, tokenizer: str, train: list[str], validation: list[str], eod_id: int | None = None) -> Path:
    """Write ``data_dir/manifest.json`` describing existing shard prefixes."""
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    tok = get_tokenizer(tokenizer)
    dtypes = set()
    splits = {}
    for split, prefixes in (("train", train), ("validation", validation)):
        entries = []
        for prefix in prefixes:
            prefix = prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix
            ds = IndexedDataset(prefix)  # raises a clear error naming a bad file
            problems = ds.check()
            if problems:
                raise PrepError("; ".join(problems))
            dtypes.add(ds.dtype.name)
            entries.append(ShardEntry(
                prefix=os.path.relpath(prefix, root), num_tokens=ds.num_tokens, num_docs=ds.num_docs,
                checksums={"bin": file_sha256(Path(ds.bin_path)), "idx": file_sha256(Path(ds.idx_path))}))
        splits[split] = entries
    if len(dtypes) > 1:
        raise PrepError(f"the shards mix token dtypes ({', '.join(sorted(dtypes))}); adopt them separately")
    m = Manifest(root=root, tokenizer=tok.spec, tokenizer_name=tok.name, vocab_size=tok.vocab_size,
                 eod_id=tok.eod_id if eod_id is None else eod_id, dtype=dtypes.pop(), splits=splits,
                 extra={"tool": "halo-prep adopt", "tool_version": TOOL_VERSION,
                        "inputs": list(train) + list(validation)})
    path = root / MANIFEST_NAME
    write_atomic(path, (json.dumps(m.to_json(), indent=1) + "\n").encode())
    return path
