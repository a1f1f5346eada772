"""logging.profile_steps: a real halo-train run writes a per-rank profile of the chosen steps."""

import json

import pytest

from halo_pretrain.train.run_config import ConfigError, load_run_config
from train_utils import make_prepared_dir, run_train, stdlib_sources, tiny_config, write_config


@pytest.mark.parametrize("steps", [[3, 2], [0, 1], [4]])
def test_profile_steps_must_be_a_range(steps):
    with pytest.raises(ConfigError, match="logging.profile_steps"):
        load_run_config("quickstart", [f"logging.profile_steps={json.dumps(steps)}"])


def test_profile_steps_must_end_within_the_run():
    load_run_config("quickstart", ["train.steps=10", "logging.profile_steps=[9, 10]"])
    with pytest.raises(ConfigError, match=r"logging.profile_steps=\[9, 11\] ends after the last step \(train.steps=10\)"):
        load_run_config("quickstart", ["train.steps=10", "logging.profile_steps=[9, 11]"])


def test_profiled_steps_are_written_per_rank(tmp_path):
    docs = stdlib_sources(60_000, skip=80)
    data = make_prepared_dir(tmp_path / "data", docs[:-2], docs[-2:])
    cfg = tiny_config(tmp_path / "run", data, train={"steps": 4}, logging={"profile_steps": [2, 3]},
                      checkpoint={"interval": 100})
    run_train(write_config(tmp_path / "run.yaml", cfg), nproc=2)
    for rank in (0, 1):
        text = (tmp_path / "run" / "profile" / f"rank{rank}.txt").read_text()
        assert text.startswith("steps 2-3 on cpu: "), text[:200]
        assert "aten::mm" in text and "by host time" in text
        trace = json.loads((tmp_path / "run" / "profile" / f"trace_rank{rank}.json").read_text())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert "aten::mm" in names
