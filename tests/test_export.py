"""halo-export: real ZeRO-0, ZeRO-3 and dense runs -> a release directory -> HaloSModel, transformers and Llama
loaders give the checkpoint's logits; the model card states what the run did."""

import hashlib
import json
import pickle
import warnings

import pytest
import torch

from halo_pretrain.config import HaloConfig
from halo_pretrain.evaluate.cli import main as eval_main
from halo_pretrain.export import export, load_run_state, main as export_main
from halo_pretrain.generate import main as generate_main
from halo_pretrain.model import HaloSModel
from train_utils import make_prepared_dir, run_train, stdlib_sources, tiny_config, write_config

X = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 6-step runs from one seed, ZeRO-0 and ZeRO-3, checkpoints at steps 3 and 6 (validation at 6);
    and a 3-step dense run without global slots (a Llama in all but name)."""
    base = tmp_path_factory.mktemp("export")
    data = make_prepared_dir(base / "data", stdlib_sources(150_000), stdlib_sources(20_000, skip=150))
    out = {}
    for stage in (0, 3):
        cfg = tiny_config(base / f"zero{stage}", data, deepspeed={"zero_stage": stage}, train={"steps": 6})
        run_train(write_config(base / f"zero{stage}.yaml", cfg))
        out[stage] = base / f"zero{stage}"
    cfg = tiny_config(base / "dense", data, train={"steps": 3}, model={"attention": "dense", "num_globals": 0})
    run_train(write_config(base / "dense.yaml", cfg))
    out["dense"] = base / "dense"
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
    assert sorted(p.name for p in out.glob("model*.safetensors*")) == ["model.safetensors"]


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
    # every command that reads a run directory says so in one line, and what to do
    for command, call in [("halo-export", lambda: export_main([str(run), str(tmp_path / "out")])),
                          ("halo-generate", lambda: generate_main([str(run), "--prompt", "x"])),
                          ("halo-eval", lambda: eval_main([str(run), "--probes", "none", "-o", str(tmp_path / "e")]))]:
        with pytest.raises(SystemExit) as err:
            call()
        message = str(err.value.code)
        assert message.startswith(f"{command}: refusing to load a checkpoint of {run}") and "\n" not in message
        assert "use a checkpoint you trust" in message
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


def test_an_out_dir_that_is_a_file_is_a_one_line_error_before_any_weight_is_read(runs, tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    for out in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        with pytest.raises(SystemExit, match=rf"halo-export: output directory {out}: {tmp_path / 'taken'} is a file"):
            export_main([str(runs[0]), str(out)])
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_the_model_card_states_shape_pattern_tokens_and_final_validation_loss(runs, tmp_path):
    from halo_pretrain.train.metrics import read_metrics

    export(runs[0], tmp_path / "s6")
    card = (tmp_path / "s6/README.md").read_text()
    val = [m for m in read_metrics(runs[0]) if m.get("val_loss") is not None]
    assert [m["step"] for m in val] == [6]  # eval.interval 0: the run validates at its last step only
    assert f"| final validation loss | {val[0]['val_loss']:.4f} (perplexity " in card and "at step 6 |" in card
    assert "| tokens trained | 768 (6 optimizer steps) |" in card  # 6 steps x 2 x 2 sequences x 32 tokens
    assert "2 layers, hidden 64, 4 heads (2 KV heads, head_dim 16)" in card
    assert "a window of 8 keys, dilated keys at offsets [16, 32]" in card and "2 learned global" in card
    assert "| tokenizer | byte |" in card and "trust_remote_code=True" in card
    export(runs[0], tmp_path / "s3", step=3)
    card = (tmp_path / "s3/README.md").read_text()
    assert "| final validation loss | not measured" in card and "| tokens trained | 384 (3 optimizer steps) |" in card


def test_the_export_loads_in_transformers_with_the_checkpoints_logits(runs, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export(runs[3], tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    config, state = load_run_state(runs[3])
    direct = HaloSModel(config)
    direct.load_state_dict(state)
    with torch.no_grad():
        assert (hf(X).logits - logits(direct)).abs().max().item() <= 1e-5
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert tokenizer.encode("def f(x):", add_special_tokens=False) == list(b"def f(x):")


def test_format_llama_exports_the_dense_run_and_refuses_halo_s_saying_why(runs, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    assert export_main([str(runs["dense"]), str(tmp_path / "llama"), "--format", "llama"]) == 0
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    assert type(llama) is LlamaForCausalLM
    config, state = load_run_state(runs["dense"])
    direct = HaloSModel(config)
    direct.load_state_dict(state)
    with torch.no_grad():
        assert (llama(X).logits - logits(direct)).abs().max().item() <= 1e-5
    assert "exported as a plain Llama model" in (tmp_path / "llama/README.md").read_text()
    with pytest.raises(SystemExit) as err:
        export_main([str(runs[0]), str(tmp_path / "no"), "--format", "llama"])
    message = str(err.value.code)
    assert message.startswith("halo-export: --format llama: HALO-S sparse attention (attention='auto') has no Llama form")
    assert "its 2 global key/value slots per layer have no Llama form" in message and "\n" not in message
    assert not (tmp_path / "no").exists()
