"""Killed runs: kill -9 and Ctrl-C mid-run leave no shard that looks complete but is not, and a
re-run of the same command produces the bytes of a clean run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def corpus_dir(tmp_path: Path, n_docs=6000, doc_bytes=4000) -> Path:
    """One JSON-lines file of random-letter documents (tens of MB: a run takes a few seconds)."""
    import json

    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghij klmnopqrstuvwxyz\n", dtype=np.uint8)
    d = tmp_path / "in"
    d.mkdir()
    with open(d / "c.jsonl", "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": bytes(rng.choice(letters, size=doc_bytes)).decode() + str(i)}) + "\n")
    return d


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def args_for(corpus: Path, out: Path) -> list[str]:
    return [str(corpus), "-o", str(out), "--tokenizer", "byte", "--docs-per-shard", "150",
            "--val-fraction", "0.05", "--workers", "2", "-q"]


def start(args):
    return subprocess.Popen([sys.executable, "-m", "data_prep", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_shards(out: Path, proc, n=2, timeout=60.0) -> None:
    t0 = time.monotonic()
    while len(list(out.glob("*.idx"))) < n:
        assert proc.poll() is None, f"halo-prep ended before {n} shards: {proc.communicate()}"
        assert time.monotonic() - t0 < timeout
        time.sleep(0.005)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    corpus = corpus_dir(tmp)
    out = tmp / "out"
    assert main(args_for(corpus, out)) == 0
    return corpus, tree(out)


def test_kill_9_then_rerun_equals_clean_run(tmp_path, clean):
    corpus, clean_tree = clean
    out = tmp_path / "out"
    proc = start(args_for(corpus, out))
    wait_for_shards(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before the kill: make the corpus bigger"
    left = tree(out)
    assert len([k for k in clean_tree if k.endswith(".idx")]) > len([k for k in left if k.endswith(".idx")])
    # every file under a final name is complete: byte for byte the clean run's file
    for name, data in left.items():
        if not name.endswith(".tmp"):
            assert data == clean_tree[name], f"{name} left by the killed run differs from the clean run's"
    assert main(args_for(corpus, out)) == 0
    assert tree(out) == clean_tree  # also: no .tmp left


def test_ctrl_c_stops_cleanly_and_resumes(tmp_path, clean):
    corpus, clean_tree = clean
    out = tmp_path / "out"
    proc = start(args_for(corpus, out))
    wait_for_shards(out, proc, n=1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "re-run the same command" in err
    assert not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    for name, data in tree(out).items():
        assert data == clean_tree[name]
    assert main(args_for(corpus, out)) == 0
    assert tree(out) == clean_tree
