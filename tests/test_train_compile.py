import pytest

from halo_pretrain.train.run_config import ConfigError, load_run_config


def test_compile_is_refused_with_zero3_before_anything_starts():
    with pytest.raises(ConfigError, match="train.compile=true works with deepspeed.zero_stage 0, 1 or 2"):
        load_run_config("quickstart", ["train.compile=true", "deepspeed.zero_stage=3"])
    assert load_run_config("quickstart", ["train.compile=true", "deepspeed.zero_stage=2"]).train.compile is True
