"""The package as users install it: a wheel, installed into a fresh virtualenv, trains from a directory
outside the checkout; the Python floor in pyproject.toml holds for the code."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train_utils import REPO, make_prepared_dir, stdlib_sources, tiny_config, train_env, write_config


def requires_python() -> tuple[int, int]:
    found = re.search(r'^requires-python\s*=\s*">=(\d+)\.(\d+)"', (REPO / "pyproject.toml").read_text(), re.M)
    return int(found.group(1)), int(found.group(2))


def test_the_python_floor_in_pyproject_holds_for_the_code():
    """vermin reads every module for the syntax and the standard-library names it uses (e.g.
    hashlib.file_digest needs 3.11) and fails when any needs a newer Python than requires-python says."""
    major, minor = requires_python()
    proc = subprocess.run([sys.executable, "-c", "import sys; from vermin import main; sys.exit(main())",
                           f"-t={major}.{minor}-", "--no-tips", "--violations", "--eval-annotations",
                           "halo_pretrain", "data_prep"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Minimum required versions: 3." in proc.stdout


@pytest.mark.slow
def test_a_wheel_in_a_fresh_virtualenv_trains_from_outside_the_checkout(tmp_path):
    src = tmp_path / "src"  # the wheel is built from a copy, so the checkout gets no build/ or egg-info
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("halo_pretrain", "data_prep"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("halo_pretrain-*.whl")
    venv = tmp_path / "venv"  # torch, deepspeed & co. come from the system; only our wheel is installed
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--ignore-installed", str(wheel)], check=True, capture_output=True, timeout=300)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in train_env().items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import halo_pretrain; print(halo_pretrain.__file__)"], cwd=outside,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the wheel's copy, not the checkout's

    data = make_prepared_dir(outside / "data", stdlib_sources(40_000, skip=90), [])
    config = write_config(outside / "run.yaml", tiny_config(outside / "run", data, train={"steps": 2},
                                                            deepspeed={"zero_stage": 1}))
    proc = subprocess.run([str(venv / "bin" / "halo-train"), "--config", str(config)], cwd=outside, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training done: step 2" in proc.stdout
    assert (outside / "run" / "checkpoints" / "step_00000002" / "complete.json").is_file()
    # the package data the wheel carries is the top-level ds_configs/, linked into the package: one copy
    assert (REPO / "halo_pretrain" / "ds_configs").resolve() == (REPO / "ds_configs").resolve()
