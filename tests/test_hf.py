"""The transformers form of an export: Auto classes through remote code, AutoTokenizer, plain Llama.

Every comparison is against halo-pretrain's own HaloSModel, generate() and tokenizers.
"""

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiktoken._educational import bpe_train  # noqa: E402
from tiktoken_ext.openai_public import r50k_pat_str  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import halo_pretrain.data.tokenizer as T  # noqa: E402
from halo_pretrain.config import HaloConfig  # noqa: E402
from halo_pretrain.data.tokenizer import get_tokenizer, write_bpe_file  # noqa: E402
from halo_pretrain.export import write_release  # noqa: E402
from halo_pretrain.generate import generate, tokenizer_name  # noqa: E402
from halo_pretrain.model import HaloSModel  # noqa: E402
from train_utils import make_prepared_dir, stdlib_sources  # noqa: E402

# W=8, max_seq_len=256: dilated offsets 16, 32, 64, 128 and random keys all matter past position 8
SMALL = dict(vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, num_globals=2,
             local_window=8, num_random=2, max_seq_len=256)
TEXTS = ["Ünïcödé ✓ 日本語 🙂 naïve café", "tabs\tand\nnewlines\r\n  spaces   end", "I'M here, it's 1234567 or 3.14159!", ""]


def halo_model(seed=0, **overrides) -> HaloSModel:
    torch.manual_seed(seed)
    model = HaloSModel(HaloConfig(**{**SMALL, **overrides}))
    for p in model.parameters():  # off the init, so that global slots, norms and the sparse pattern matter
        p.data.add_(0.3 * torch.randn_like(p))
    return model.eval()


def tokens(b, n, seed=1):
    return torch.randint(0, 257, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    return make_prepared_dir(tmp_path_factory.mktemp("data"), ["hello world\n" * 20], ["bye\n" * 20])


@pytest.fixture(scope="module")
def release(byte_data, tmp_path_factory):
    """A HALO-S model (gather backend) exported with the byte tokenizer."""
    model = halo_model(attention="gather")
    out = tmp_path_factory.mktemp("release") / "halo-tiny"
    write_release(model, out, data_dir=byte_data, step=6, tokens=4096)
    return model, out


def test_auto_classes_load_the_export_through_its_remote_code(release):
    model, out = release
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_halo.HaloSForCausalLM"
    assert config["model_type"] == "halo-s" and config["local_window"] == 8 and config["eos_token_id"] == 256
    shim = (out / "modeling_halo.py").read_text()
    assert "from halo_pretrain.hf.modeling import" in shim and "def forward" not in shim  # imported, not copied
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoConfig.from_pretrained(out)
    hf_config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert hf_config.halo_config() == model.config
    assert (hf_config.num_hidden_layers, hf_config.max_position_embeddings) == (2, 256)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(hf).__name__ == "HaloSForCausalLM" and type(hf).__module__.startswith("transformers_modules")
    assert isinstance(hf.model, HaloSModel) and hf.model.lm_head.weight is hf.model.embed.weight
    x = tokens(2, 200)
    with torch.no_grad():
        expected = model(x)
        for use_cache in (False, True):
            logits = hf(x, use_cache=use_cache).logits
            assert logits.dtype == torch.float32 and (logits - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("attention", ["gather", "dense"])
def test_greedy_generate_gives_halo_generates_tokens_for_a_left_padded_batch(byte_data, tmp_path, attention):
    model = halo_model(seed=2, attention=attention)
    write_release(model, tmp_path / "m", data_dir=byte_data)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "m", trust_remote_code=True)
    prompts = ["Once", "def fibonacci(n):\n    if", "The quick brown fox jumps over the lazy dog; " * 2]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # left padding is the tokenizer's default
    out = hf.generate(**batch, max_new_tokens=70, do_sample=False)  # reaches position 160: past offsets 16..128
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    expected = generate(model, [tok.encode(p) for p in prompts], 70, temperature=0, stop_tokens=[256])
    for row, want in zip(new, expected):
        got = row[: row.index(256)] if 256 in row else row  # transformers pads a finished row with eos
        assert got == want
    assert all(len(set(w)) > 5 for w in expected)  # varied text: the comparison has teeth


def test_the_cache_path_gives_full_forward_logits_one_and_several_tokens_at_a_time(release):
    model, out = release
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    seq = tokens(2, 180, seed=3)
    pad = 5  # row 1 is 5 tokens shorter, left-padded
    with torch.no_grad():
        full = [model(seq[:1])[0], model(seq[1:, :-pad])[0]]
        ids = seq.clone()
        ids[1] = torch.cat([torch.full((pad,), 256), seq[1, :-pad]])
        mask = torch.ones_like(ids)
        mask[1, :pad] = 0
        first = hf(ids[:, :40], attention_mask=mask[:, :40], use_cache=True)
        cache, logits = getattr(first, "cache", None) or first.past_key_values, [first.logits]
        done = 40
        for m in (1, 9, 1, 30, 1, 2, 96):
            step = hf(ids[:, done:done + m], attention_mask=mask[:, :done + m], cache=cache, past_key_values=cache)
            logits.append(step.logits)
            done += m
    logits = torch.cat(logits, dim=1)
    assert done == 180
    scale = full[0].abs().max().item()  # decoding sums in another order than the full pass: relative 1e-5
    assert (logits[0] - full[0]).abs().max().item() <= 1e-5 * scale
    assert (logits[1, pad:] - full[1]).abs().max().item() <= 1e-5 * scale


def test_labels_give_halo_s_loss_and_train(release):
    model, out = release
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    x = tokens(2, 64, seed=4)
    labels = x.clone()
    labels[0, 10:20] = -100
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    with torch.no_grad():
        _, expected = model(x, labels=shifted)
        assert hf(x, labels=labels).loss.item() == pytest.approx(expected.item(), rel=1e-6)
    hf.train()
    loss = hf(x, labels=labels).loss
    loss.backward()
    assert hf.model.blocks[0].attn.global_k.grad.abs().sum() > 0  # the training path, not the cached one


def test_padding_that_halo_s_cannot_honour_is_refused_with_what_to_do(release):
    model, out = release
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    x = tokens(2, 30, seed=5)
    right = torch.ones_like(x)
    right[1, 25:] = 0
    with torch.no_grad():  # right padding without a cache: causal attention never reads it
        logits = hf(x, attention_mask=right).logits
        assert (logits - model(x)).abs().max().item() <= 1e-5
        with pytest.raises(ValueError, match="pad on the left"):
            from transformers import DynamicCache

            hf(x, attention_mask=right, cache=DynamicCache(), past_key_values=DynamicCache())
        holes = torch.ones_like(x)
        holes[0, 10] = 0
        with pytest.raises(ValueError, match="padding between a row's tokens"):
            hf(x, attention_mask=holes)
        with pytest.raises(ValueError, match="position_ids differ"):
            hf(x, position_ids=torch.arange(30)[None] + 3)
        assert torch.equal(hf(x, position_ids=torch.arange(30)[None], use_cache=False).logits, logits)


def test_a_model_saved_by_transformers_loads_in_halo_pretrain(release, tmp_path):
    model, out = release
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    hf.save_pretrained(tmp_path / "resaved")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' keys in config.json are not unknown HaloConfig fields
        again = HaloSModel.from_pretrained(tmp_path / "resaved")
    x = tokens(1, 100, seed=6)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", trust_remote_code=True)
        assert torch.equal(reloaded(x).logits, model(x))


# ---- tokenizers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ranks():
    corpus = "\n".join(stdlib_sources(4000))[:4000] + " 1234 56789 2026. Ünïcödé ✓ 日本語"
    return bpe_train(corpus, vocab_size=400, pat_str=r50k_pat_str, visualise=None)


@pytest.fixture
def tokenizer_spec(request, tiny_ranks, tmp_path, monkeypatch):
    """byte; a local BPE file; tiktoken encodings by name, whose download is replaced by the tiny ranks."""
    monkeypatch.setattr(T, "_CACHE", {})
    if request.param == "byte":
        return "byte"
    if request.param == "file":
        write_bpe_file(tiny_ranks, tmp_path / "tiny.tiktoken")
        return str(tmp_path / "tiny.tiktoken")
    import tiktoken.registry
    from tiktoken_ext import openai_public

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: dict(tiny_ranks))
    return request.param


@pytest.mark.parametrize("tokenizer_spec", ["byte", "file", "cl100k_base", "o200k_base"], indirect=True)
def test_auto_tokenizer_gives_the_projects_ids_and_decodes_back(tokenizer_spec, tmp_path):
    ours = get_tokenizer(tokenizer_spec)
    data = make_prepared_dir(tmp_path / "data", ["some text"], ["more text"], tokenizer=tokenizer_spec)
    model = halo_model(vocab_size=(ours.vocab_size + 63) // 64 * 64, num_layers=1)
    write_release(model, tmp_path / "out", data_dir=data)
    hf = AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=True)
    corpus = stdlib_sources(30_000) + TEXTS
    for text in corpus:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text), text[:80]
        assert hf.decode(ids) == text
    merged = sum(len(ours.encode(t)) for t in corpus[:3]) < sum(len(t.encode()) for t in corpus[:3])
    assert merged or tokenizer_spec == "byte"  # BPE merges happen, so merges are what is compared
    assert hf.eos_token_id == hf.pad_token_id == ours.eod_id
    assert hf.encode("a<|endoftext|>b", add_special_tokens=False) == ours.encode("a") + [ours.eod_id] + ours.encode("b")
    assert hf.padding_side == "left" and hf.model_max_length == 256
    # halo-generate reads the same tokenizer_config.json
    assert get_tokenizer(tokenizer_name(tmp_path / "out")).encode(TEXTS[2]) == ours.encode(TEXTS[2])


# ---- Llama -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_a_dense_model_without_global_slots_exports_as_plain_llama(byte_data, tmp_path, tied):
    from transformers import LlamaForCausalLM

    model = halo_model(seed=3, attention="dense", num_globals=0, tie_embeddings=tied, rope_theta=500000.0)
    summary = write_release(model, tmp_path / "llama", fmt="llama", data_dir=byte_data)
    assert summary["format"] == "llama"
    config = json.loads((tmp_path / "llama/config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert not list((tmp_path / "llama").glob("*.py"))  # no remote code
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    assert type(llama) is LlamaForCausalLM
    assert (llama.lm_head.weight is llama.model.embed_tokens.weight) == tied
    x = tokens(2, 200, seed=7)
    with torch.no_grad():
        assert (llama(x).logits - model(x)).abs().max().item() <= 1e-5
    prompt = tokens(1, 20, seed=8)
    out = llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False)
    expected = generate(model, prompt.tolist(), 40, temperature=0, stop_tokens=[256])[0]
    got = out[0, 20:].tolist()
    assert (got[: got.index(256)] if 256 in got else got) == expected
    with pytest.raises(ValueError, match="not a HALO-S model"):
        HaloSModel.from_pretrained(tmp_path / "llama")


@pytest.mark.parametrize("overrides, why", [
    (dict(attention="gather", num_globals=0), r"HALO-S sparse attention \(attention='gather'\) has no Llama form"),
    (dict(attention="dense"), r"its 2 global key/value slots per layer have no Llama form"),
    (dict(attention="dense", num_globals=0, norm="layernorm"), r"Llama's norm is RMSNorm"),
    (dict(attention="dense", num_globals=0, use_swiglu=False), r"Llama's MLP is SwiGLU"),
])
def test_a_model_without_a_llama_form_is_refused_saying_why(tmp_path, overrides, why):
    with pytest.raises(ValueError, match=why) as err:
        write_release(halo_model(**overrides), tmp_path / "out", fmt="llama")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before anything is written
