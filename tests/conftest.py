"""Two kinds of test session.

`python -m pytest -q` (CI, any CPU machine): Triton's kernels run in its CPU interpreter and DeepSpeed
on its CPU accelerator; tests marked `gpu` are skipped.
`python -m pytest -q -m gpu` on a machine with CUDA (benchmarks/gpu_suite.sh): the GPU suite, with
compiled Triton kernels and DeepSpeed on CUDA. Without CUDA it skips every test cleanly.

Triton reads TRITON_INTERPRET when it is first imported, and importing halo_pretrain.model already
imports it (through torch._dynamo), so the choice is made here, before any test module is collected.
"""

import os

import pytest

# Tests never need the network or a wandb account.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cuda_available() -> bool:
    import torch  # does not import triton

    return torch.cuda.is_available()


def pytest_configure(config):
    config.gpu_session = (config.getoption("markexpr") or "").strip() == "gpu" and _cuda_available()
    if not config.gpu_session:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if config.gpu_session:
        return
    reason = ("GPU tests run in a session of their own, `python -m pytest -q -m gpu` (this one runs Triton in "
              "its CPU interpreter)") if _cuda_available() else "needs a CUDA device"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
