"""`halo-export RUN_DIR [--step N] OUT_DIR`: a training checkpoint (any ZeRO stage) -> a release directory.

OUT_DIR gets the weights as model.safetensors (or model-00001-of-0000N.safetensors shards and
model.safetensors.index.json above --max-shard-size), config.json, tokenizer.json and
tokenizer_config.json for the tokenizer of the run's data, generation_config.json and a model card
(README.md). With --format halo-s (the default) config.json holds the full HaloConfig and an
`auto_map` to configuration_halo.py / modeling_halo.py beside it, so the directory loads with
`HaloSModel.from_pretrained(OUT_DIR)` and with transformers' `AutoModelForCausalLM.from_pretrained(OUT_DIR,
trust_remote_code=True)`; with --format llama a dense model without global slots becomes a plain
LlamaForCausalLM directory.
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

FORMATS = ("halo-s", "llama")
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


def write_tokenizer_files(data_dir: Path, out_dir: Path, max_seq_len: int) -> dict | None:
    """tokenizer.json and tokenizer_config.json from a data manifest (None when there is no manifest).

    tokenizer_config.json is transformers' and holds halo-pretrain's record too: the tokenizer
    (a local BPE file is copied beside the weights), its eod_id, and the data directory.
    """
    from .data.manifest import load_manifest
    from .data.tokenizer import get_tokenizer
    from .hf.tokenization import write_tokenizer

    if not (data_dir / "manifest.json").is_file():
        return None
    manifest = load_manifest(data_dir)
    tokenizer = manifest.tokenizer
    loaded = get_tokenizer(tokenizer)
    if Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, out_dir / Path(tokenizer).name)
        tokenizer = Path(tokenizer).name
    record = {"tokenizer": tokenizer, "tokenizer_name": manifest.tokenizer_name, "eod_id": manifest.eod_id,
              "vocab_size": manifest.vocab_size, "data": str(manifest.root)}
    write_tokenizer(loaded, out_dir, max_seq_len, record)
    return record


REMOTE_CODE = ("configuration_halo.py", "modeling_halo.py")
AUTO_MAP = {"AutoConfig": "configuration_halo.HaloSConfig", "AutoModelForCausalLM": "modeling_halo.HaloSForCausalLM"}
HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def write_model_config(config: HaloConfig, out_dir: Path, fmt: str, dtype: str, eod_id: int | None) -> None:
    """config.json: transformers' config of the format (it also holds every HaloConfig field for halo-s),
    plus the remote-code modules for halo-s (they import halo_pretrain: one implementation)."""
    from importlib import resources

    token_ids = {} if eod_id is None else {"bos_token_id": eod_id, "eos_token_id": eod_id, "pad_token_id": eod_id}
    for name in REMOTE_CODE:
        (out_dir / name).unlink(missing_ok=True)
    if fmt == "llama":
        from .hf.llama import llama_config

        record = llama_config(config, HF_DTYPES[dtype], token_ids)
    else:
        record = {"model_type": "halo-s", "architectures": ["HaloSForCausalLM"], "auto_map": AUTO_MAP,
                  **config.to_dict(), "dtype": HF_DTYPES[dtype], "use_cache": True, **token_ids}
    (out_dir / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    if fmt == "halo-s":
        for name in REMOTE_CODE:
            (out_dir / name).write_text(resources.files("halo_pretrain.hf").joinpath("remote", name).read_text())
    if token_ids:
        (out_dir / "generation_config.json").write_text(json.dumps(token_ids, indent=2) + "\n")


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None, max_shard_size: str = "5GB",
           dtype: str = "fp32", fmt: str = "halo-s") -> dict:
    """Export a complete checkpoint of `run_dir`; returns a summary of what was written."""
    from .hf.card import final_val_loss
    from .hf.llama import why_not_llama
    from .train.checkpoint import find_checkpoint, read_trainer_state

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_release_args(out_dir, dtype, fmt, max_shard_size)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    trainer_state = read_trainer_state(find_checkpoint(run_dir, step))
    if fmt == "llama":  # refused before the weights are read
        reason = why_not_llama(HaloConfig.from_dict(trainer_state.model))
        if reason:
            raise ValueError(f"--format llama: {reason}")
    config, state = load_run_state(run_dir, trainer_state.step)
    model = HaloSModel(config)
    model.load_state_dict(state)  # the checkpoint fits the config it was saved with, or this says which key not
    val_loss, val_step = final_val_loss(run_dir, trainer_state.step)
    summary = write_release(model, out_dir, fmt=fmt, dtype=dtype, max_shard_size=max_shard_size,
                            data_dir=run_data_dir(run_dir), step=trainer_state.step, tokens=trainer_state.tokens,
                            val_loss=val_loss, val_step=val_step)
    return {**summary, "step": trainer_state.step, "zero_stage": trainer_state.zero_stage}


def check_release_args(out_dir: Path, dtype: str, fmt: str, max_shard_size: str) -> int:
    """Bad arguments fail before any weight is read; returns the shard size in bytes."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    for path in (out_dir, *out_dir.parents):
        if path.exists() and not path.is_dir():
            raise ValueError(f"output directory {out_dir}: {path} is a file; give a new directory or an existing one")
    return parse_size(max_shard_size)


def write_release(model: HaloSModel, out_dir: str | Path, fmt: str = "halo-s", dtype: str = "fp32",
                  max_shard_size: str = "5GB", data_dir: str | Path | None = None, step: int = 0, tokens: int = 0,
                  val_loss: float | None = None, val_step: int | None = None) -> dict:
    """Write `model` as a release directory (what halo-export writes for a checkpoint).

    data_dir: the prepared data it trained on, whose manifest names the tokenizer (None: no tokenizer
    files). step, tokens, val_loss, val_step: training facts for the model card.
    """
    from .hf.card import CardFacts, model_card
    from .hf.llama import llama_weights, why_not_llama

    out_dir = Path(out_dir)
    max_bytes = check_release_args(out_dir, dtype, fmt, max_shard_size)
    config = model.config
    if fmt == "llama" and why_not_llama(config):
        raise ValueError(f"--format llama: {why_not_llama(config)}")
    if data_dir is not None and (Path(data_dir) / "manifest.json").is_file():
        from .data.manifest import load_manifest

        manifest = load_manifest(data_dir)
        if manifest.vocab_size > config.vocab_size:
            raise ValueError(f"{manifest.root}: its tokenizer ({manifest.tokenizer_name}) has {manifest.vocab_size} ids, "
                             f"more than the model's vocab_size={config.vocab_size}: not the data this model trained on")
    weights = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        weights.pop("lm_head.weight")  # the same tensor as embed.weight; from_pretrained ties it again
    if fmt == "llama":
        weights = llama_weights(weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "model_type": fmt, "step": str(step), "tokens": str(tokens)}
    files = save_weights(weights, out_dir, max_bytes, metadata)
    tokenizer = write_tokenizer_files(Path(data_dir), out_dir, config.max_seq_len) if data_dir else None
    write_model_config(config, out_dir, fmt, dtype, tokenizer and tokenizer["eod_id"])
    facts = CardFacts(config, fmt, model.num_parameters(), step, tokens, dtype,
                      tokenizer and tokenizer["tokenizer_name"], val_loss, val_step)
    (out_dir / "README.md").write_text(model_card(out_dir.resolve().name, facts))
    return {"files": files, "format": fmt, "parameters": model.num_parameters(),
            "tokenizer": tokenizer and tokenizer["tokenizer"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="halo-export", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a halo-train run directory")
    p.add_argument("out_dir", help="where to write the release directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest complete one)")
    p.add_argument("--format", default="halo-s", choices=FORMATS,
                   help="halo-s (any model; transformers with trust_remote_code) or llama (a dense model with "
                        "num_globals 0, as a plain LlamaForCausalLM)")
    p.add_argument("--max-shard-size", default="5GB", help="split the weights into shards above this size")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of the exported weights")
    args = p.parse_args(argv)
    from .train.checkpoint import CheckpointError

    try:
        summary = export(args.run_dir, args.out_dir, args.step, args.max_shard_size, args.dtype, args.format)
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"halo-export: {e}") from None
    except pickle.UnpicklingError as e:
        raise SystemExit(unpickling_refusal("halo-export", args.run_dir, e)) from None
    print(f"halo-export: step {summary['step']} (ZeRO-{summary['zero_stage']}), "
          f"{summary['parameters'] / 1e6:.2f}M parameters -> {args.out_dir} ({summary['format']}): "
          f"config.json, {', '.join(summary['files'])}, README.md"
          + (f", tokenizer.json + {TOKENIZER_FILE} ({summary['tokenizer']})" if summary["tokenizer"] else ""))
    return 0


def unpickling_refusal(command: str, source, error: Exception) -> str:
    """The one-line error of every command that reads a training checkpoint holding more than weights."""
    return (f"{command}: refusing to load a checkpoint of {source} that holds more than weights (only weights are "
            f"unpickled, never code): {str(error).splitlines()[-1]}; use a checkpoint you trust (--step picks another)")


if __name__ == "__main__":
    sys.exit(main())
