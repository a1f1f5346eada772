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
