"""Loading checkpoint files so that they cannot run code: torch.load with weights_only=True and an
allowlist of the plain-data classes DeepSpeed stores, for our own loads and for DeepSpeed's (its
load_checkpoint, universal loader, ds_to_universal and zero_to_fp32 all pass weights_only=False)."""

from __future__ import annotations

import contextlib
import pickle
import runpy
import sys

import torch

_torch_load = torch.load  # the real one, whatever weights_only_torch_load does to torch.load later


class UnsafeFileError(pickle.UnpicklingError):
    """A file the weights-only unpickler refused: it holds more than tensors and plain data (or is
    no pickle at all). Nothing in it was run."""

    def __init__(self, path, detail: str):
        super().__init__(f"{path}: refused by the weights-only loader ({detail})")
        self.path, self.detail = str(path), detail


def deepspeed_safe_globals() -> list:
    """The plain-data classes DeepSpeed stores in its checkpoints, allowed when unpickling weights-only."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_torch_load(f, *args, **kwargs):
    """torch.load that unpickles weights only, whatever the caller asked for; a refusal names the file."""
    kwargs["weights_only"] = True
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        try:
            return _torch_load(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            # torch's own message advises weights_only=False; the refusal itself is in its context
            reason = e.__context__ if isinstance(e.__context__, pickle.UnpicklingError) else e
            raise UnsafeFileError(getattr(f, "name", f), str(reason).strip().splitlines()[0]) from None


@contextlib.contextmanager
def weights_only_torch_load():
    """Make every torch.load inside (DeepSpeed's included) a safe_torch_load."""
    original = torch.load
    torch.load = safe_torch_load
    try:
        yield
    finally:
        torch.load = original


def run_module_weights_only(module: str, argv: list[str]) -> None:
    """Run `python -m module argv...` with every torch.load weights-only (for DeepSpeed's converters)."""
    sys.argv = [module, *argv]
    with weights_only_torch_load():
        runpy.run_module(module, run_name="__main__", alter_sys=True)
