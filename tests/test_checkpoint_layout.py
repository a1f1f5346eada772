"""Checkpoint integrity, weights-only loading, the non-finite checks: in-process, no training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from halo_pretrain.fileio import sha256_file
from halo_pretrain.train.checkpoint import ProblemKind, UnsafeFileError, weights_are_finite, weights_only_torch_load
from halo_pretrain.train.checkpoint.layout import (checksum_problem, completeness_problem, unpickle_problem,
                                                   write_complete)
from halo_pretrain.train.trainer import GradientWatch, _PoisonGradient


class Payload:
    """Unpickling it runs code: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def make_checkpoint(tag_dir: Path) -> Path:
    tag_dir.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(3)}, "ds_version": "0.19"}, tag_dir / "mp_rank_00_model_states.pt")
    (tag_dir / "trainer_state.json").write_text("{}")
    write_complete(tag_dir, 1, {rel: sha256_file(tag_dir / rel) for rel in ("mp_rank_00_model_states.pt",
                                                                           "trainer_state.json")})
    return tag_dir


def rewrite_record(tag_dir: Path, rel: str) -> None:
    """What an attacker who can write the file does too: size and checksum in complete.json updated."""
    complete = json.loads((tag_dir / "complete.json").read_text())
    complete["files"][rel] = (tag_dir / rel).stat().st_size
    complete["sha256"][rel] = sha256_file(tag_dir / rel)
    (tag_dir / "complete.json").write_text(json.dumps(complete))


def test_each_problem_has_its_kind_and_file(tmp_path):
    tag = make_checkpoint(tmp_path / "step_00000001")
    assert completeness_problem(tag) is None and checksum_problem(tag) is None and unpickle_problem(tag) is None
    pt = tag / "mp_rank_00_model_states.pt"
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pt.write_bytes(bytes(data))
    problem = checksum_problem(tag)
    assert (problem.kind, problem.file, problem.expected) == (ProblemKind.CHECKSUM, pt.name, False)
    pt.write_bytes(bytes(data[:100]))
    assert (completeness_problem(tag).kind, completeness_problem(tag).file) == (ProblemKind.SIZE, pt.name)
    (tag / "complete.json").unlink()
    assert completeness_problem(tag).kind is ProblemKind.UNFINISHED and completeness_problem(tag).expected


def test_a_pickle_that_runs_code_is_refused_unread(tmp_path):
    tag = make_checkpoint(tmp_path / "step_00000001")
    marker = tmp_path / "ran"
    torch.save({"module": Payload(marker)}, tag / "mp_rank_00_model_states.pt")
    rewrite_record(tag, "mp_rank_00_model_states.pt")
    assert checksum_problem(tag) is None  # checksums cannot tell
    problem = unpickle_problem(tag)
    assert (problem.kind, problem.file) == (ProblemKind.UNSAFE, "mp_rank_00_model_states.pt")
    assert "posix.mkdir" in problem.detail and "weights_only" not in str(problem)  # not torch's unsafe advice
    assert not marker.exists()
    # the rank that does not check this file (2 ranks share the files) reports nothing
    assert unpickle_problem(tag, rank=1, world_size=2) is None and unpickle_problem(tag, 0, 2) is not None


def test_deepspeeds_own_loads_are_weights_only_inside_the_context(tmp_path):
    """DeepSpeed's checkpoint engine passes weights_only=False: inside the context it unpickles weights only."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"module": Payload(marker)}, path)
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.arange(3.0)}}, good)
    engine, original = TorchCheckpointEngine(), torch.load
    with weights_only_torch_load():
        assert torch.equal(engine.load(str(good))["module"]["w"], torch.arange(3.0))
        with pytest.raises(UnsafeFileError, match=r"evil\.pt: refused by the weights-only loader") as e:
            engine.load(str(path))
    assert e.value.path == str(path) and not marker.exists()
    assert torch.load is original  # restored afterwards


def test_the_universal_converter_runs_weights_only(tmp_path):
    """ds_to_universal is run through run_module_weights_only: its torch.load(weights_only=False) is refused."""
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"module": Payload(marker)}, path)
    (tmp_path / "converter_like.py").write_text(textwrap.dedent("""
        import sys, torch
        torch.load(sys.argv[1], weights_only=False)
        print("loaded")
    """))
    script = ("import sys; from halo_pretrain.train.checkpoint.safe_load import run_module_weights_only; "
              "run_module_weights_only('converter_like', sys.argv[1:])")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{Path(__file__).resolve().parents[1]}")
    proc = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "loaded" not in proc.stdout
    assert "UnsafeFileError" in proc.stderr and "evil.pt" in proc.stderr
    assert not marker.exists()


class FakeEngine:
    def __init__(self, module, stage=0):
        self.module, self.stage = module, stage

    def zero_optimization_stage(self):
        return self.stage


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_are_finite_sees_one_bad_value(bad):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    assert weights_are_finite(FakeEngine(model))
    with torch.no_grad():
        model[1].bias[1] = bad
    assert not weights_are_finite(FakeEngine(model))
    with torch.no_grad():  # large but finite weights are not flagged
        model[1].bias[1] = 3e30
    assert weights_are_finite(FakeEngine(model))


def test_gradient_watch_flags_a_nonfinite_gradient_with_a_finite_loss():
    model = torch.nn.Linear(4, 1)
    watch = GradientWatch(model.parameters(), torch.device("cpu"))
    x = torch.randn(8, 4)
    model(x).pow(2).mean().backward()
    assert not bool(watch.nonfinite()) and float(watch.total) != 0.0
    watch.reset()
    loss = _PoisonGradient.apply(model(x).pow(2).mean())
    assert torch.isfinite(loss)
    loss.backward()
    assert bool(watch.nonfinite())
    watch.reset()
    assert not bool(watch.nonfinite())
