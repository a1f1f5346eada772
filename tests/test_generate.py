"""Cached generation computes the model's own function: logits and greedy tokens equal full forward passes."""

import json

import pytest
import torch

from halo_pretrain.config import HaloConfig
from halo_pretrain.generate import generate, sample_next
from halo_pretrain.generate import main as generate_main
from halo_pretrain.model import HaloSModel, KVCache

# W=6 and max_seq_len=160: dilated offsets 12, 24, 48, 96 and random keys all matter past position 6
SMALL = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_globals=2,
             local_window=6, num_random=2, max_seq_len=160)


def make_model(seed=0, **overrides) -> HaloSModel:
    torch.manual_seed(seed)
    model = HaloSModel(HaloConfig(**{**SMALL, **overrides}))
    for p in model.parameters():  # move off the init so global slots and norms matter
        p.data.add_(0.3 * torch.randn_like(p))
    return model.eval()


def random_prompt(n, seed, vocab=97):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_by_full_forward(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("attention", ["gather", "reference", "dense"])
def test_greedy_cached_equals_argmax_of_full_forward_token_for_token(attention):
    model = make_model(attention=attention)
    prompt = random_prompt(9, seed=3)
    expected = greedy_by_full_forward(model, prompt, 60)  # reaches position 68: past offsets 12, 24, 48
    got = generate(model, [prompt], max_new_tokens=60, temperature=0)[0]
    assert got == expected
    assert len(set(got)) > 3  # the model does not collapse to one token, so the comparison has teeth


@pytest.mark.parametrize("attention", ["gather", "dense"])
def test_cached_logits_equal_full_forward_logits_at_every_position(attention):
    model = make_model(seed=1, attention=attention)
    seq = torch.tensor([random_prompt(150, seed=4)])
    with torch.no_grad():
        full = model(seq)[0]
        cache = KVCache(model.config, batch=1, capacity=150)
        prompt_len = 5
        logits = [model.forward_cached(seq[:, :prompt_len], cache)[0]]
        for pos in range(prompt_len, 149):
            logits.append(model.forward_cached(seq[:, pos:pos + 1], cache)[0])
    cached = torch.cat(logits)
    assert cached.shape == (149, 97)
    assert (cached - full[:149]).abs().max().item() < 1e-5 * full.abs().max().item()


@pytest.mark.parametrize("attention", ["gather", "dense"])
def test_left_padded_rows_and_several_tokens_per_call_give_each_rows_own_logits(attention):
    """Rows of different lengths (left-padded, `start` says where each begins), then chunks of 1 to 7
    tokens per call: every real position's logits are those of the row's own full forward pass."""
    model = make_model(seed=3, attention=attention)
    rows = [random_prompt(n, seed=20 + n) for n in (140, 90, 80)]
    prompt = [r[:n] for r, n in zip(rows, (60, 10, 3))]  # prompts of 60, 10 and 3 tokens
    longest = 60
    padded = torch.tensor([[0] * (longest - len(p)) + p for p in prompt])
    start = torch.tensor([longest - len(p) for p in prompt])
    cache = KVCache(model.config, batch=3, capacity=longest + 80)
    with torch.no_grad():
        first = model.forward_cached(padded, cache, start)
        fed = 0
        later = []
        for m in (1, 7, 3, 1, 5) * 4:  # 68 more tokens per row
            chunk = torch.tensor([r[len(p) + fed: len(p) + fed + m] for r, p in zip(rows, prompt)])
            later.append(model.forward_cached(chunk, cache, start))
            fed += m
        later = torch.cat(later, dim=1)
        for b, (row, p) in enumerate(zip(rows, prompt)):
            full = model(torch.tensor([row[: len(p) + fed]]))[0]
            scale = full.abs().max().item()
            assert (first[b, start[b]:] - full[: len(p)]).abs().max().item() < 1e-5 * scale
            assert (later[b] - full[len(p): len(p) + fed]).abs().max().item() < 1e-5 * scale
    kept = KVCache(model.config, batch=3, capacity=longest)
    with torch.no_grad():
        last = model.forward_cached(padded, kept, start, logits_to_keep=1)
    assert last.shape == (3, 1, 97) and torch.allclose(last[:, 0], first[:, -1], rtol=0, atol=1e-5)


def test_a_cached_position_past_max_seq_len_is_refused():
    model = make_model()
    cache = KVCache(model.config, batch=1, capacity=170)
    with torch.no_grad():
        model.forward_cached(torch.tensor([random_prompt(160, seed=1)]), cache)
        with pytest.raises(ValueError, match="sequence length 161 exceeds HaloConfig.max_seq_len=160"):
            model.forward_cached(torch.tensor([[5]]), cache)


def test_each_token_reads_its_halo_neighbours_not_the_whole_past():
    """The sparse pattern must matter: a dense decode of a HALO-S model's cache gives other logits."""
    model = make_model(seed=2)
    seq = torch.tensor([random_prompt(120, seed=5)])
    with torch.no_grad():
        full = model(seq)[0]
        sparse_cache, dense_cache = (KVCache(model.config, batch=1, capacity=120) for _ in range(2))
        model.forward_cached(seq[:, :100], sparse_cache)
        model.forward_cached(seq[:, :100], dense_cache)
        sparse = model.forward_cached(seq[:, 100:101], sparse_cache)[0, 0]
        model.config.attention = "dense"
        try:
            dense = model.forward_cached(seq[:, 100:101], dense_cache)[0, 0]
        finally:
            model.config.attention = "gather"
    assert torch.allclose(sparse, full[100], atol=1e-5)
    assert not torch.allclose(dense, full[100], atol=1e-3)


def test_a_batch_of_prompts_of_different_lengths_matches_each_prompt_alone():
    model = make_model(seed=5)
    prompts = [random_prompt(n, seed=10 + n) for n in (3, 17, 40)]
    batch = generate(model, prompts, max_new_tokens=30, temperature=0)
    alone = [generate(model, [p], max_new_tokens=30, temperature=0)[0] for p in prompts]
    assert batch == alone
    assert batch[0] == greedy_by_full_forward(model, prompts[0], 30)


def test_stop_token_ends_a_row_and_others_continue():
    model = make_model(seed=5)
    prompts = [random_prompt(n, seed=10 + n) for n in (3, 17)]
    free = generate(model, prompts, max_new_tokens=20, temperature=0)
    stop = free[0][4]
    first = free[0].index(stop)
    out = generate(model, prompts, max_new_tokens=20, temperature=0, stop_tokens=[stop])
    assert out[0] == free[0][:first]
    cut = free[1].index(stop) if stop in free[1] else 20
    assert out[1] == free[1][:cut]


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k():
    model = make_model(seed=6)
    prompt = [random_prompt(8, seed=1)]
    a = generate(model, prompt, max_new_tokens=25, temperature=1.0, seed=7)
    b = generate(model, prompt, max_new_tokens=25, temperature=1.0, seed=7)
    c = generate(model, prompt, max_new_tokens=25, temperature=1.0, seed=8)
    assert a == b and a != c
    # top_k=1 is greedy whatever the temperature
    assert generate(model, prompt, 25, temperature=5.0, top_k=1, seed=3) == generate(model, prompt, 25, temperature=0)


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    top_p = sample_next(logits, 1.0, top_p=0.7, generator=gen)  # 0.5 + 0.3 reaches 0.7: tokens 0, 1
    assert set(top_p.tolist()) == {0, 1}
    top_k = sample_next(logits, 1.0, top_k=3, generator=gen)
    assert set(top_k.tolist()) == {0, 1, 2}
    freq = (sample_next(logits, 1.0, generator=gen) == 0).float().mean().item()
    assert abs(freq - 0.5) < 0.05


def test_generation_stops_at_max_seq_len_with_a_warning():
    model = make_model(seed=1)
    with pytest.warns(UserWarning, match="max_seq_len=160"):
        out = generate(model, [random_prompt(150, seed=2)], max_new_tokens=30, temperature=0)
    assert len(out[0]) == 10


def test_a_prompt_longer_than_max_seq_len_is_a_clear_error():
    model = make_model()
    with pytest.raises(ValueError, match=r"prompt 1 has 161 tokens.*max_seq_len=160"):
        generate(model, [[1, 2], random_prompt(161, seed=0)], max_new_tokens=2)


# ---- halo-generate ---------------------------------------------------------------------------------
def exported(tmp_path, tokenizer_record=True):
    torch.manual_seed(0)
    model = HaloSModel(HaloConfig(**{**SMALL, "vocab_size": 320, "max_seq_len": 256}))
    model.save_pretrained(tmp_path)
    if tokenizer_record:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer": "byte"}))
    return HaloSModel.from_pretrained(tmp_path)


def test_halo_generate_decodes_a_batch_with_the_recorded_tokenizer(tmp_path, capsys):
    model = exported(tmp_path / "m")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe end\n")
    assert generate_main([str(tmp_path / "m"), "--prompt", "def f(x):", "--prompt-file", str(prompts),
                          "--max-new-tokens", "20", "--temperature", "0", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["prompt"] for x in lines] == ["def f(x):", "Once upon a time", "The end"]
    expected = generate(model, [list(p.encode()) for p in ("def f(x):", "Once upon a time", "The end")], 20,
                        temperature=0, stop_tokens=[256])
    for line, tokens in zip(lines, expected):
        assert line["tokens"] == tokens
        assert line["completion"] == bytes(t for t in tokens if t < 256).decode("utf-8", "replace")


def test_halo_generate_errors_name_what_to_do(tmp_path):
    exported(tmp_path / "m")
    with pytest.raises(SystemExit, match=r"prompt 0 has 300 tokens, more than the model's max_seq_len=256"):
        generate_main([str(tmp_path / "m"), "--prompt", "x" * 300])
    with pytest.raises(SystemExit, match=r"--stop 'ab' is 2 tokens"):
        generate_main([str(tmp_path / "m"), "--prompt", "hi", "--stop", "ab"])
    exported(tmp_path / "bare", tokenizer_record=False)
    with pytest.raises(SystemExit, match=r"no tokenizer_config.json .*pass --tokenizer"):
        generate_main([str(tmp_path / "bare"), "--prompt", "hi"])


def test_a_truncated_weights_file_is_a_one_line_error_naming_it(tmp_path):
    exported(tmp_path / "m")
    weights = tmp_path / "m/model.safetensors"
    data = weights.read_bytes()
    for cut in (len(data) // 2, 5):  # the tensors cut short; the header itself cut short
        weights.write_bytes(data[:cut])
        with pytest.raises(SystemExit) as err:
            generate_main([str(tmp_path / "m"), "--prompt", "hi"])
        message = str(err.value.code)
        assert message.startswith(f"halo-generate: {weights} is not a readable safetensors file")
        assert "truncated or corrupt; copy it again or re-run halo-export" in message and "\n" not in message
