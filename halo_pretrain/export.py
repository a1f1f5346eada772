"""`halo-export RUN_DIR [--step N] OUT_DIR`: a training checkpoint (any ZeRO stage) -> a release directory.

OUT_DIR gets config.json (model_type "halo-s" and the full HaloConfig), the weights as
model.safetensors (or model-00001-of-0000N.safetensors shards and model.safetensors.index.json above
--max-shard-size), and tokenizer_config.json naming the tokenizer of the run's data. Load it with
`HaloSModel.from_pretrained(OUT_DIR)`.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import shutil
import sys
from pathlib import Path

import torch

from .config import HaloConfig
from .model import HaloSModel

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer_config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_run_state(run_dir: str | Path, step: int | None = None) -> tuple[HaloConfig, dict[str, torch.Tensor]]:
    """(config, consolidated fp32 state dict) of a complete checkpoint of the run; an error lists the steps."""
    from .train.checkpoint import load_model_state

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    return load_model_state(run_dir, step)


def load_run_model(run_dir: str | Path, step: int | None = None) -> HaloSModel:
    config, state = load_run_state(run_dir, step)
    model = HaloSModel(config)
    model.load_state_dict(state)
    return model.eval()


def run_config(run_dir: str | Path) -> dict:
    """The resolved run config the trainer wrote into the run directory ({} when there is none)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def run_data_dir(run_dir: str | Path) -> Path | None:
    """The prepared data directory a run trained on (the first of a blend), if the run says."""
    data = run_config(run_dir).get("data") or {}
    path = data.get("path") or (data.get("blend") or [{}])[0].get("path")
    return Path(path) if path else None


def parse_size(text: str) -> int:
    """'500MB', '2GB', '1.5G', '1000000' -> bytes (decimal units, as Hugging Face uses)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)b?\s*", str(text).lower())
    if not m:
        raise ValueError(f"size {text!r}: give bytes or a number with KB, MB, GB")
    return int(float(m.group(1)) * 1000 ** " kmgt".index(m.group(2) or " "))


def shard_plan(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in state order; a shard closes before it would pass max_shard_bytes."""
    shards, current, size = [], [], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def save_weights(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int, metadata: dict) -> list[str]:
    """Write model.safetensors, or shards plus the index; returns the file names written."""
    from safetensors.torch import save_file

    for stale in list(out_dir.glob("model*.safetensors")) + [out_dir / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    plan = shard_plan(state, max_shard_bytes)
    if len(plan) == 1:
        save_file(state, str(out_dir / "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, keys in enumerate(plan, 1):
        name = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        save_file({k: state[k] for k in keys}, str(out_dir / name), metadata=metadata)
        weight_map.update({k: name for k in keys})
        names.append(name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def write_tokenizer_record(run_dir: Path, out_dir: Path) -> dict | None:
    """tokenizer_config.json from the run's data manifest; a local BPE file is copied beside the weights."""
    from .data.manifest import load_manifest

    data_dir = run_data_dir(run_dir)
    if data_dir is None or not (data_dir / "manifest.json").is_file():
        return None
    manifest = load_manifest(data_dir)
    tokenizer = manifest.tokenizer
    if Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, out_dir / Path(tokenizer).name)
        tokenizer = Path(tokenizer).name
    record = {"tokenizer": tokenizer, "tokenizer_name": manifest.tokenizer_name, "eod_id": manifest.eod_id,
              "vocab_size": manifest.vocab_size, "data": str(manifest.root)}
    (out_dir / TOKENIZER_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None, max_shard_size: str = "5GB",
           dtype: str = "fp32") -> dict:
    """Export a complete checkpoint of `run_dir`; returns a summary of what was written."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    config, state = load_run_state(run_dir, step)
    model = HaloSModel(config)
    model.load_state_dict(state)  # the checkpoint fits the config it was saved with, or this says which key not
    weights = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        weights.pop("lm_head.weight")  # the same tensor as embed.weight; from_pretrained ties it again
    from .train.checkpoint import find_checkpoint, read_trainer_state

    trainer_state = read_trainer_state(find_checkpoint(run_dir, step))
    out_dir.mkdir(parents=True, exist_ok=True)
    config.to_json(out_dir / "config.json")
    metadata = {"format": "pt", "model_type": "halo-s", "step": str(trainer_state.step),
                "tokens": str(trainer_state.tokens)}
    files = save_weights(weights, out_dir, max_bytes, metadata)
    tokenizer = write_tokenizer_record(run_dir, out_dir)
    return {"step": trainer_state.step, "zero_stage": trainer_state.zero_stage, "files": files,
            "parameters": model.num_parameters(), "tokenizer": tokenizer and tokenizer["tokenizer"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="halo-export", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a halo-train run directory")
    p.add_argument("out_dir", help="where to write config.json and the safetensors weights")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest complete one)")
    p.add_argument("--max-shard-size", default="5GB", help="split the weights into shards above this size")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of the exported weights")
    args = p.parse_args(argv)
    from .train.checkpoint import CheckpointError

    try:
        summary = export(args.run_dir, args.out_dir, args.step, args.max_shard_size, args.dtype)
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"halo-export: {e}") from None
    except pickle.UnpicklingError as e:
        raise SystemExit(f"halo-export: refusing to load a checkpoint of {args.run_dir} that holds more than "
                         f"weights (only weights are unpickled): {str(e).splitlines()[-1]}") from None
    print(f"halo-export: step {summary['step']} (ZeRO-{summary['zero_stage']}), "
          f"{summary['parameters'] / 1e6:.2f}M parameters -> {args.out_dir}: "
          f"config.json, {', '.join(summary['files'])}"
          + (f", {TOKENIZER_FILE} ({summary['tokenizer']})" if summary["tokenizer"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
