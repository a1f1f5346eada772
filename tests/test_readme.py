"""README.md as a newcomer meets it: every command in its ```bash blocks, and every ```python block, runs
as written, in order, in a scratch copy of the repository (the quickstart included: about 4 minutes on
2 cores). The only commands left out are in SKIPPED, each with the reason it cannot run offline on a
CPU-only machine. Its links stay inside the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from halo_pretrain.train.metrics import read_metrics
from train_utils import REPO

README = REPO / "README.md"

# A README command (as written, without its trailing comment) -> why this test does not run it.
SKIPPED = {
    'pip install -e ".[dev]" --extra-index-url https://download.pytorch.org/whl/cpu':
        "installs from PyPI and download.pytorch.org, the network; .ci/run runs it, as written, before the tests",
    "python -m pytest -q": "the test suite itself",
    "halo-prep corpus/*.jsonl -o data/web --tokenizer gpt2 --workers 32":
        "a corpus of your own, and tiktoken downloads gpt2's BPE from the network",
    "halo-train --config 125m data.path=data/corpus-gpt2 train.steps=5000": "a GPU and a GPT-2-tokenized corpus",
    "bash launch/single_gpu_debug.sh --config RUN.yaml": "a GPU",
    "bash launch/single_node.sh --config RUN.yaml": "GPUs",
    "HOSTFILE=hosts bash launch/multi_node.sh --config RUN.yaml": "several nodes reachable over ssh",
    "HOSTFILE=hosts NODE_RANK=k MASTER_ADDR=node0 bash launch/multi_node.sh --config RUN.yaml": "several nodes",
    "NP=16 HOSTFILE=hosts bash launch/mpi.sh --config RUN.yaml": "an MPI cluster",
    "sbatch --nodes=4 slurm/train.sbatch --config runs/125m.yaml run.dir=/shared/runs/125m": "a Slurm cluster",
    "bash slurm/prep.sh 16 -o /shared/data/web --tokenizer gpt2 /shared/raw/web": "a Slurm cluster",
}
OUTPUTS = ("data", "runs", "out", "eval", "plots")  # what the commands write: never taken from the checkout


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def strip_comment(line: str) -> str:
    return re.sub(r"\s+#\s.*$", "", line).rstrip()


def readme_commands(text: str) -> list[tuple[str, str]]:
    """("bash" or "python", command) in README order; a bash command's continuation lines are joined."""
    out = []
    for lang, body in readme_blocks(text):
        if lang == "python":
            out.append(("python", body))
        elif lang == "bash":
            for command in re.sub(r"\\\n\s*", " ", body).splitlines():
                if command.strip() and not command.lstrip().startswith("#"):
                    out.append(("bash", strip_comment(command)))
    return out


def test_skipped_commands_are_in_the_readme_and_the_set_up_is_two_commands():
    commands = [c for lang, c in readme_commands(README.read_text()) if lang == "bash"]
    assert set(SKIPPED) <= set(commands), f"stale SKIPPED entries: {set(SKIPPED) - set(commands)}"
    set_up = readme_blocks(README.read_text().split("## Set up", 1)[1])[0][1]
    install = 'pip install -e ".[dev]" --extra-index-url https://download.pytorch.org/whl/cpu'
    assert [strip_comment(line) for line in set_up.splitlines()] == [install, "bash launch/quickstart.sh"]
    assert f"python3 -m pip install -q -e {install[len('pip install -e '):]}" in (REPO / ".ci" / "run").read_text()


def test_links_stay_inside_the_repository():
    links = re.findall(r"\]\(([^)]+)\)", README.read_text())
    assert links
    for link in links:
        target = (REPO / link.split("#")[0]).resolve()
        assert "://" not in link and target.is_relative_to(REPO) and target.exists(), f"README link {link}"


def test_model_sizes_the_readme_states_are_the_models():
    from halo_pretrain.config import PRESETS, get_preset
    from halo_pretrain.train.preflight import count_parameters
    from halo_pretrain.train.run_config import load_run_config

    text = " ".join(README.read_text().split())
    stated = dict(re.findall(r"`([\w.-]+)` \((\d+(?:\.\d+)?)M", text))
    assert {"tiny", "small", "medium", "125m"} <= set(stated) <= set(PRESETS)
    for name, millions in stated.items():
        digits = len(millions.split(".")[1]) if "." in millions else 0
        assert round(count_parameters(get_preset(name)) / 1e6, digits) == float(millions), name
    quickstart = load_run_config("quickstart", ["data.path=unused"]).halo_config()
    assert f"a {count_parameters(quickstart) / 1e6:.2f}M-parameter HALO-S model" in text
    assert quickstart.num_layers == 4 and get_preset("tiny").num_layers == 5  # the recipe's comments say so


def stdlib_words() -> set[str]:
    words = set()
    for path in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"):
        words.update(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", path.read_text(encoding="utf-8", errors="replace")))
    return words


def check_quickstart(work: Path, out: str, err: str) -> None:
    run = work / "runs" / "quickstart"
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 701))
    assert "train.exit_at_step=350 reached" in out and "resumed from step 350" in out
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000700"
    printed = re.search(r"== validation loss (\d+\.\d+) nats per byte at step 700", err)
    assert printed and printed.group(1) == f"{metrics[-1]['val_loss']:.3f}", err[-2000:]
    assert metrics[-1]["val_loss"] <= 2.0  # nats per byte, over the whole validation split
    assert "[halo-train] step 700/700 | loss " in out  # plain lines: stdout is a pipe here
    # DeepSpeed's CPU shared-memory op is not built (TORCH_EXTENSIONS_DIR points into the scratch copy)
    assert not list((work / "torch_extensions").glob("*shm*"))
    generated = out[out.rindex("training done"):].split("\n", 1)[1]
    generated = "\n".join(line for line in generated.splitlines() if not re.match(r"\[(halo-train|\d{4}-)", line))
    assert generated.startswith("def ") and "\nimport " in generated and "\nclass " in generated
    words = [w for w in re.findall(r"[A-Za-z_][A-Za-z_0-9]*", generated) if len(w) >= 3]
    real = [w for w in words if w in stdlib_words()]
    assert len(words) >= 20 and len(real) >= 0.7 * len(words), (generated, sorted(set(words) - set(real)))


def check_after(work: Path, command: str, out: str, err: str) -> None:
    """What each command must leave behind, beyond exit status 0."""
    if command == "bash launch/quickstart.sh":
        check_quickstart(work, out, err)
    elif command.startswith("halo-prep \"$(python"):
        manifest = json.loads((work / "data" / "stdlib-all" / "manifest.json").read_text())
        assert manifest["tokenizer"] == "byte" and sum(s["num_docs"] for s in manifest["splits"]["train"]) > 1000
    elif command.startswith("halo-train --config quickstart --print-config"):
        assert yaml.safe_load(out)["model"]["num_layers"] == 4
    elif command.startswith("bash launch/cpu_debug.sh"):
        assert [m["step"] for m in read_metrics(work / "runs" / "debug")] == list(range(1, 11))
    elif command.startswith("halo-export"):
        assert (work / "out" / "quickstart" / "model.safetensors").is_file()
    elif command.startswith("halo-generate"):
        assert out.startswith("def ") and len(out) > 100
    elif command.startswith("halo-eval"):
        report = json.loads((work / "eval" / "quickstart" / "eval.json").read_text())
        assert report["perplexity"]["loss"] <= 2.0
        assert list(report["probes"]["table"]["kv"]) == ["128", "256"]  # default lengths that fit kv
    elif command in ("python -m pytest -q -m gpu", "bash benchmarks/gpu_suite.sh"):
        # the GPU suite on a machine without CUDA: collected, every test skipped, none run
        assert re.search(r"^\d+ skipped, \d+ deselected in ", out, flags=re.M) and " passed" not in out, out[-2000:]
    elif command.startswith("halo-plot"):
        assert (work / "plots" / "loss_vs_step.png").is_file() and (work / "plots" / "val_loss_vs_step.png").is_file()


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    for tool in ("halo-prep", "halo-train", "halo-export", "halo-generate", "halo-eval", "halo-plot"):
        assert shutil.which(tool, path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]), \
            f"{tool} is not installed: pip install -e . first"
    work = tmp_path / "repo"
    work.mkdir()
    for entry in REPO.iterdir():  # the checkout, without outputs of earlier runs
        if not entry.name.startswith(".") and entry.name not in OUTPUTS:
            (work / entry.name).symlink_to(entry)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")}
    env.update(PATH=str(Path(sys.executable).parent) + os.pathsep + env["PATH"], PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               TORCH_EXTENSIONS_DIR=str(work / "torch_extensions"))
    ran = []
    for lang, command in readme_commands(README.read_text()):
        if command in SKIPPED:
            continue
        argv = ["bash", "-c", command] if lang == "bash" else [sys.executable, "-c", command]
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (f"README command failed (exit {proc.returncode}):\n{command}\n--- stdout\n"
                                      f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
        check_after(work, command, proc.stdout, proc.stderr)
        ran.append(command)
    assert len(ran) == 12 and ran[0] == "bash launch/quickstart.sh"
