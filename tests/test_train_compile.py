"""train.compile: refused with ZeRO-3; a real halo-train run with the whole model compiled (inductor on CPU)
trains the same losses as the eager run."""

from pathlib import Path

import pytest

from halo_pretrain.train.run_config import ConfigError, load_run_config
from train_utils import losses, make_prepared_dir, run_train, stdlib_sources, tiny_config, write_config


def test_compile_is_refused_with_zero3_before_anything_starts():
    with pytest.raises(ConfigError, match="train.compile=true works with deepspeed.zero_stage 0, 1 or 2"):
        load_run_config("quickstart", ["train.compile=true", "deepspeed.zero_stage=3"])
    assert load_run_config("quickstart", ["train.compile=true", "deepspeed.zero_stage=2"]).train.compile is True


@pytest.mark.slow
def test_compiled_run_matches_eager_losses(tmp_path, monkeypatch):
    docs = stdlib_sources(120_000, skip=60)
    data = make_prepared_dir(tmp_path / "data", docs[:-2], docs[-2:])
    runs = {}
    for compiled in (False, True):
        name = "compiled" if compiled else "eager"
        cfg = tiny_config(tmp_path / name, data, train={"steps": 5, "compile": compiled},
                          deepspeed={"zero_stage": 1}, checkpoint={"interval": 100})
        cache = tmp_path / f"inductor-{name}"
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
        run_train(write_config(tmp_path / f"{name}.yaml", cfg), timeout=600)
        runs[name] = losses(tmp_path / name)
        generated = list(Path(cache).rglob("*.py"))
        assert bool(generated) == compiled, f"{name}: inductor wrote {len(generated)} kernels"
    assert len(runs["compiled"]) == len(runs["eager"]) == 5
    for step, (got, want) in enumerate(zip(runs["compiled"], runs["eager"]), 1):
        assert abs(got - want) <= 2e-4 * abs(want), f"step {step}: compiled loss {got} vs eager {want}"


@pytest.mark.parametrize("attention", ["triton", "gather", "dense"])
def test_every_block_runs_compiled_under_activation_checkpointing(attention):
    """With activation checkpointing the blocks are compiled one by one. Each HALO-S block's pattern
    depends on its layer index; dynamo once compiled a graph per layer and ran every block past its
    recompile limit (8) eager. Counted here: every block's forward and its recompute run a compiled graph."""
    import torch

    from halo_pretrain.config import HaloConfig
    from halo_pretrain.model import HaloSModel
    from halo_pretrain.train.engine import compile_model

    layers = 6  # a graph per layer and grad mode (12) would pass the recompile limit (8)
    config = HaloConfig(vocab_size=97, hidden_size=32, num_layers=layers, num_heads=2, num_kv_heads=1, num_globals=2,
                        local_window=4, max_seq_len=64, attention=attention)
    torch.manual_seed(0)
    model = HaloSModel(config)
    ids = torch.randint(0, 97, (2, 25))

    def run_block(block, x, cos, sin, backend):  # reentrant, as DeepSpeed's checkpoint function is
        return torch.utils.checkpoint.checkpoint(lambda h: block(h, cos, sin, backend), x, use_reentrant=True)

    model.block_runner = run_block
    _, eager_loss = model(ids[:, :-1], labels=ids[:, 1:], return_logits=False)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    graphs, calls = [], []

    def counting_compiler(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            calls.append(len(graphs))
            return gm.forward(*args)
        return run

    torch._dynamo.reset()
    compile_model(model, activation_checkpointing=1, device=torch.device("cpu"), compiler=counting_compiler)
    _, loss = model(ids[:, :-1], labels=ids[:, 1:], return_logits=False)
    loss.backward()
    assert len(calls) == 2 * layers, f"{len(calls)} of {2 * layers} block calls ran a compiled graph"
    if attention != "gather":  # layer 0's graph, then one with the layer as an input per grad mode
        assert len(graphs) <= 3, f"{len(graphs)} graphs for {layers} identical blocks"
    assert torch.equal(loss, eager_loss)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), eager_grads))
