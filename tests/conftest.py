import os

# Tests never need the network, a GPU or a wandb account.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The Triton kernels run under the CPU interpreter (tests/test_triton_attention.py). Triton reads this
# when it is first imported, and importing halo_pretrain.model already imports it (through
# torch._dynamo), so it is set here, before any test module is collected.
os.environ["TRITON_INTERPRET"] = "1"
