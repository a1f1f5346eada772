"""Export of a ZeRO-0 run in bf16 (fp16 keeps its masters the same way): the fp32 master weights from DeepSpeed's optimizer state
(DeepSpeed's own zero_to_fp32 reads only ZeRO-1..3 checkpoints, and failed on these)."""

from pathlib import Path

import pytest
import torch

from halo_pretrain.train.checkpoint import load_model_state
from train_utils import make_prepared_dir, run_train, stdlib_sources, tiny_config, write_config


@pytest.mark.slow
def test_zero0_bf16_run_exports_its_fp32_masters(tmp_path):
    docs = stdlib_sources(120_000, skip=60)
    data = make_prepared_dir(tmp_path / "data", docs[:-2], docs[-2:])
    cfg = tiny_config(tmp_path / "run", data, train={"steps": 3, "precision": "bf16"},
                      checkpoint={"interval": 3})
    run_train(write_config(tmp_path / "run.yaml", cfg))
    _, weights = load_model_state(tmp_path / "run")
    saved = torch.load(next(Path(tmp_path / "run" / "checkpoints").rglob("mp_rank_00_model_states.pt")),
                       map_location="cpu", weights_only=True)
    half = saved["module"]
    assert set(weights) == set(half)
    assert all(w.dtype == torch.float32 for w in weights.values())
    for name, w in weights.items():
        assert torch.equal(w.to(half[name].dtype), half[name]), name
    # three updates of lr 3e-3 leave masters between bf16 values: more bits than the 16-bit weights hold
    assert any(not torch.equal(w, w.to(half[name].dtype).float()) for name, w in weights.items())
