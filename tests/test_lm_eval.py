"""lm-evaluation-harness on an export (`--model hf`, trust_remote_code) with the shipped offline tasks.

The harness's numbers must be HaloSModel's: every loglikelihood and every generation is recomputed here
with halo-pretrain alone and compared, then the metrics are aggregated from those.
"""

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from halo_pretrain.config import HaloConfig  # noqa: E402
from halo_pretrain.data.tokenizer import get_tokenizer  # noqa: E402
from halo_pretrain.evaluate.lm_eval_tasks import PATH, TASKS  # noqa: E402
from halo_pretrain.export import write_release  # noqa: E402
from halo_pretrain.generate import generate  # noqa: E402
from halo_pretrain.model import HaloSModel  # noqa: E402
from train_utils import make_prepared_dir  # noqa: E402

LIMIT = 4
BYTE = get_tokenizer("byte")


def loglikelihood(model, context: str, continuation: str) -> tuple[float, bool]:
    ids = BYTE.encode(context + continuation)
    n = len(BYTE.encode(continuation))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0, -n:].double(), dim=-1)
    target = torch.tensor(ids[-n:])
    return float(logp[torch.arange(n), target].sum()), bool(torch.equal(logp.argmax(-1), target))


def docs(task: str) -> list[dict]:
    name = task.removeprefix("halo_smoke_") + ".jsonl"
    return [json.loads(line) for line in (PATH / "data" / name).read_text().splitlines()][:LIMIT]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    base = tmp_path_factory.mktemp("lm_eval")
    data = make_prepared_dir(base / "data", ["hello world\n" * 20], ["bye\n" * 20])
    torch.manual_seed(0)
    model = HaloSModel(HaloConfig(vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                  num_globals=2, local_window=8, max_seq_len=256)).eval()
    for p in model.parameters():  # off the init: varied logits and generations
        p.data.add_(0.3 * torch.randn_like(p))
    write_release(model, base / "export", data_dir=data)
    from transformers import AutoTokenizer

    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={base / 'export'},trust_remote_code=True", tasks=["halo_smoke"],
        task_manager=TaskManager(include_path=str(PATH), include_defaults=False), device="cpu", batch_size=3,
        limit=LIMIT, log_samples=True, bootstrap_iters=0)
    tokenizer = AutoTokenizer.from_pretrained(base / "export", trust_remote_code=True)  # what the harness decodes with
    return model, tokenizer, results


def samples(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_the_tag_runs_the_three_shipped_tasks(evaluated):
    _, _, results = evaluated
    assert set(results["results"]) == set(TASKS)
    assert all(len(results["samples"][t]) == LIMIT for t in TASKS)


def test_cloze_loglikelihoods_accuracy_and_perplexity_are_halo_s(evaluated):
    model, _, results = evaluated
    ours = [loglikelihood(model, d["context"], d["target"]) for d in docs("halo_smoke_cloze")]
    for sample, (ll, greedy) in zip(samples(results, "halo_smoke_cloze"), ours):
        (their_ll, their_greedy), = sample["resps"][0]
        assert their_ll == pytest.approx(ll, abs=1e-4) and their_greedy == greedy
    metrics = results["results"]["halo_smoke_cloze"]
    assert metrics["acc,none"] == pytest.approx(sum(g for _, g in ours) / LIMIT)
    assert metrics["perplexity,none"] == pytest.approx(math.exp(-sum(ll for ll, _ in ours) / LIMIT), rel=1e-4)


def test_multiple_choice_scores_every_choice_with_halo_s(evaluated):
    model, _, results = evaluated
    correct = correct_norm = 0
    for sample, doc in zip(samples(results, "halo_smoke_choice"), docs("halo_smoke_choice")):
        context = f"Question: {doc['question']}\nAnswer:"
        ours = [loglikelihood(model, context, " " + choice)[0] for choice in doc["choices"]]
        theirs = [resp[0][0] for resp in sample["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        correct += max(range(4), key=lambda i: ours[i]) == doc["answer"]
        correct_norm += max(range(4), key=lambda i: ours[i] / len(" " + doc["choices"][i])) == doc["answer"]
    metrics = results["results"]["halo_smoke_choice"]
    assert metrics["acc,none"] == pytest.approx(correct / LIMIT)
    assert metrics["acc_norm,none"] == pytest.approx(correct_norm / LIMIT)


def test_generation_is_halo_generates_greedy_text_cut_at_the_stop_strings(evaluated):
    model, hf_tokenizer, results = evaluated
    batch = docs("halo_smoke_recall")
    new = generate(model, [BYTE.encode(d["prompt"]) for d in batch], 16, temperature=0, stop_tokens=[BYTE.eod_id])
    expected = []
    for tokens in new:
        text = hf_tokenizer.decode(tokens)
        expected.append(min((text.split(stop)[0] for stop in ("\n", ".")), key=len))
    got = [s["resps"][0][0] for s in samples(results, "halo_smoke_recall")]
    assert got == expected
    assert len({t for t in expected}) > 1 and any(expected)  # varied text: the comparison has teeth
    exact = sum(g.strip().lower() == d["answer"].strip().lower() for g, d in zip(got, batch)) / LIMIT
    assert results["results"]["halo_smoke_recall"]["exact_match,none"] == pytest.approx(exact)
