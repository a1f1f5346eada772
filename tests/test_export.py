"""halo-export: real ZeRO-0 and ZeRO-3 runs -> config.json + safetensors -> from_pretrained -> identical logits."""

import hashlib
import json
import pickle
import warnings

import pytest
import torch

from halo_pretrain.config import HaloConfig
from halo_pretrain.export import export, load_run_state, main as export_main
from halo_pretrain.generate import main as generate_main
from halo_pretrain.model import HaloSModel
from train_utils import make_prepared_dir, run_train, stdlib_sources, tiny_config, write_config

X = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 6-step runs from one seed, ZeRO-0 and ZeRO-3, checkpoints at steps 3 and 6."""
    base = tmp_path_factory.mktemp("export")
    data = make_prepared_dir(base / "data", stdlib_sources(150_000), stdlib_sources(20_000, skip=150))
    out = {}
    for stage in (0, 3):
        cfg = tiny_config(base / f"zero{stage}", data, deepspeed={"zero_stage": stage}, train={"steps": 6})
        run_train(write_config(base / f"zero{stage}.yaml", cfg))
        out[stage] = base / f"zero{stage}"
    return out


def logits(model):
    with torch.no_grad():
        return model.eval()(X)


def test_zero0_export_loads_with_the_checkpoints_exact_weights_and_logits(runs, tmp_path):
    summary = export(runs[0], tmp_path / "out")
    assert summary["step"] == 6 and summary["zero_stage"] == 0 and summary["files"] == ["model.safetensors"]
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["model_type"] == "halo-s" and config["hidden_size"] == 64 and config["local_window"] == 8
    assert json.loads((tmp_path / "out/tokenizer_config.json").read_text())["tokenizer"] == "byte"
    loaded = HaloSModel.from_pretrained(tmp_path / "out")
    # an independent read of DeepSpeed's ZeRO-0 file (weights only) gives the same tensors
    raw = torch.load(runs[0] / "checkpoints/step_00000006/mp_rank_00_model_states.pt", weights_only=True)["module"]
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, raw[name]), name
    reference = HaloSModel(loaded.config)
    reference.load_state_dict(raw)
    assert torch.equal(logits(loaded), logits(reference))


def test_zero3_export_gives_the_same_logits_as_the_zero0_run_of_the_same_seed(runs, tmp_path):
    assert export_main([str(runs[3]), str(tmp_path / "z3")]) == 0
    assert export(runs[0], tmp_path / "z0")["step"] == 6
    z3, z0 = logits(HaloSModel.from_pretrained(tmp_path / "z3")), logits(HaloSModel.from_pretrained(tmp_path / "z0"))
    assert (z3 - z0).abs().max().item() < 1e-4
    config, state = load_run_state(runs[3])
    direct = HaloSModel(config)
    direct.load_state_dict(state)
    assert torch.equal(logits(direct), z3)


def test_sharded_export_loads_the_same_model_and_stale_files_are_replaced(runs, tmp_path):
    out = tmp_path / "out"
    summary = export(runs[0], out, max_shard_size="40KB")
    assert len(summary["files"]) > 3
    assert summary["files"][0] == f"model-00001-of-{len(summary['files']):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    single = HaloSModel.from_pretrained(export(runs[0], tmp_path / "single") and tmp_path / "single")
    assert set(index["weight_map"]) == set(single.state_dict()) - {"lm_head.weight"}  # tied head stored once
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in single.parameters())
    assert torch.equal(logits(HaloSModel.from_pretrained(out)), logits(single))
    export(runs[0], out)  # re-export unsharded into the same directory
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_a_missing_shard_is_named(runs, tmp_path):
    out = tmp_path / "out"
    files = export(runs[0], out, max_shard_size="40KB")["files"]
    (out / files[1]).unlink()
    with pytest.raises(FileNotFoundError, match=files[1]):
        HaloSModel.from_pretrained(out)


def test_step_selects_the_checkpoint_and_a_missing_step_lists_the_ones_there_are(runs, tmp_path, capsys):
    assert export(runs[0], tmp_path / "s3", step=3)["step"] == 3
    assert not torch.equal(logits(HaloSModel.from_pretrained(tmp_path / "s3")),
                           logits(HaloSModel.from_pretrained(export(runs[0], tmp_path / "s6") and tmp_path / "s6")))
    with pytest.raises(SystemExit, match=r"no complete checkpoint of step 5; complete steps: 3, 6"):
        export_main([str(runs[0]), "--step", "5", str(tmp_path / "s5")])
    with pytest.raises(SystemExit, match=r"run directory .*nowhere does not exist"):
        export_main([str(tmp_path / "nowhere"), str(tmp_path / "x")])


def test_export_refuses_to_unpickle_code_in_a_checkpoint(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(runs[0]), str(run)))
    tag = run / "checkpoints/step_00000006"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    torch.save({"module": Payload()}, tag / "mp_rank_00_model_states.pt")
    # a checkpoint from elsewhere: its completion record describes the file as it is
    payload = tag / "mp_rank_00_model_states.pt"
    complete = json.loads((tag / "complete.json").read_text())
    complete["files"][payload.name] = payload.stat().st_size
    if "sha256" in complete:
        complete["sha256"][payload.name] = hashlib.sha256(payload.read_bytes()).hexdigest()
    (tag / "complete.json").write_text(json.dumps(complete))
    with pytest.raises(pickle.UnpicklingError):
        export(run, tmp_path / "out", step=6)
    from halo_pretrain.train.checkpoint import load_model_state

    with pytest.raises(pickle.UnpicklingError):  # the trainer's reader refuses too, not only halo-export
        load_model_state(run, step=6)
    assert not marker.exists()


def test_a_directory_without_weights_is_a_clear_error(tmp_path):
    HaloSModel(HaloConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no model.safetensors"):
        HaloSModel.from_pretrained(tmp_path)


def test_a_config_from_a_newer_version_loads_with_a_warning_naming_the_unknown_fields(runs, tmp_path):
    export(runs[0], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(sliding_chunks=4, moe_experts=8)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"unknown HaloConfig fields \['moe_experts', 'sliding_chunks'\]"):
        model = HaloSModel.from_pretrained(tmp_path)
    assert model.config.hidden_size == 64


def test_halo_generate_runs_from_a_run_directory_with_the_runs_tokenizer(runs, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 64-token model may reach max_seq_len
        assert generate_main([str(runs[0]), "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0",
                              "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "def " and len(line["tokens"]) <= 12
    config, state = load_run_state(runs[0])
    model = HaloSModel(config)
    model.load_state_dict(state)
    from halo_pretrain.generate import generate

    assert line["tokens"] == generate(model, [list(b"def ")], 12, temperature=0, stop_tokens=[256])[0]
