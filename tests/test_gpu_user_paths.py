"""The GPU suite's user paths: the README's quickstart end to end on the GPU (prepare, train, stop at
half, resume, generate), then halo-export, halo-generate and halo-eval on the model it trained.
Run with `python -m pytest -q -m gpu`; skipped without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from halo_pretrain.train.metrics import read_metrics
from train_utils import REPO, train_env

pytestmark = pytest.mark.gpu


def cli(*args, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], env=train_env(gpu=True), cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("quickstart")
    env = train_env(gpu=True)
    env["WORK"] = str(work)
    proc = subprocess.run(["bash", str(REPO / "launch" / "quickstart.sh")], env=env, cwd=work, text=True,
                          capture_output=True, timeout=900)
    return {"proc": proc, "run": work / "runs" / "quickstart", "data": work / "data" / "stdlib"}


def test_quickstart_trains_resumes_and_generates_on_the_gpu(quickstart):
    proc, run = quickstart["proc"], quickstart["run"]
    assert proc.returncode == 0, f"quickstart exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    assert "device: CUDA GPU, bf16" in proc.stderr
    metrics = read_metrics(run)
    steps = [m["step"] for m in metrics]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] >= 2
    half = steps[-1] // 2
    assert f"resumed from step {half}" in proc.stdout, proc.stdout[-3000:]
    assert all(m["loss"] is not None for m in metrics)
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert val and val[-1] < metrics[0]["loss"] - 1.0, (metrics[0]["loss"], val)
    assert proc.stdout.count("-" * 40) == 3  # halo-generate printed the three prompts' completions


@pytest.fixture(scope="module")
def exported(quickstart, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    cli("halo_pretrain.export", str(quickstart["run"]), str(out))
    return out


def test_export_from_a_gpu_run_holds_the_trained_weights(quickstart, exported):
    from halo_pretrain.export import load_run_model
    from halo_pretrain.model import HaloSModel

    model = HaloSModel.from_pretrained(exported, device="cuda").eval()
    from_run = load_run_model(quickstart["run"]).to("cuda").eval()
    ids = torch.randint(0, 256, (2, 200), device="cuda")
    with torch.no_grad():
        assert torch.equal(model(ids), from_run(ids))
        _, loss = model(ids[:, :-1], labels=ids[:, 1:])
    assert torch.isfinite(loss)


def test_generate_on_the_gpu_is_the_argmax_of_full_forwards(exported):
    from halo_pretrain.data.tokenizer import get_tokenizer
    from halo_pretrain.model import HaloSModel

    proc = cli("halo_pretrain.generate", str(exported), "--prompt", "def ", "--temperature", "0",
               "--max-new-tokens", "40", "--device", "cuda", "--json")
    tokens = json.loads(proc.stdout.splitlines()[0])["tokens"]
    assert len(tokens) == 40
    model = HaloSModel.from_pretrained(exported, device="cuda").eval()
    ids = get_tokenizer("byte").encode("def ")
    want = []
    with torch.no_grad():
        for _ in range(40):
            logits = model(torch.tensor([ids + want], device="cuda"))
            want.append(int(logits[0, -1].argmax()))
    assert tokens == want


def test_eval_on_the_gpu_matches_perplexity_on_the_cpu(quickstart, exported, tmp_path):
    from halo_pretrain.evaluate.perplexity import perplexity
    from halo_pretrain.model import HaloSModel

    cli("halo_pretrain.evaluate.cli", str(exported), "-o", str(tmp_path), "--device", "cuda", "--data",
        str(quickstart["data"]), "--max-tokens", "20000", "--samples", "1")
    report = json.loads((tmp_path / "eval.json").read_text())
    cpu = perplexity(HaloSModel.from_pretrained(exported, device="cpu"), quickstart["data"], max_tokens=20000)
    assert report["perplexity"]["tokens"] == cpu["tokens"]
    assert abs(report["perplexity"]["loss"] - cpu["loss"]) <= 1e-4 * cpu["loss"]
    assert report["probes"]["table"], "no probe results"
    assert (tmp_path / "probes_heatmap.png").stat().st_size > 1000


def test_the_transformers_release_on_the_gpu_matches_halo_generate(exported):
    transformers = pytest.importorskip("transformers")  # the GPU image carries it; the [hf] extra elsewhere
    from halo_pretrain.model import HaloSModel

    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).to("cuda").eval()
    tok = transformers.AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    model = HaloSModel.from_pretrained(exported, device="cuda").eval()
    prompts = ["def ", "import os\nclass Config:\n    def __init__(self"]
    batch = tok(prompts, return_tensors="pt", padding=True).to("cuda")
    with torch.no_grad():
        ids = batch["input_ids"][1:]
        assert (hf(input_ids=ids).logits - model(ids)).abs().max().item() <= 1e-5
        out = hf.generate(**batch, max_new_tokens=40, do_sample=False)
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    for prompt, row in zip(prompts, new):
        proc = cli("halo_pretrain.generate", str(exported), "--prompt", prompt, "--temperature", "0",
                   "--max-new-tokens", "40", "--device", "cuda", "--json")
        want = json.loads(proc.stdout.splitlines()[0])["tokens"]
        eos = tok.eos_token_id  # transformers stops a row there and pads it; halo-generate goes on
        row, want = (r[:r.index(eos)] if eos in r else r for r in (row, want))
        assert row == want and len(want) >= 5
