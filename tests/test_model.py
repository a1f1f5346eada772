"""HaloSModel: causality, prefix consistency, backends agreeing on every gradient, counting, save/load, bad input."""

import pytest
import torch

from halo_pretrain.config import PRESETS, HaloConfig, get_preset
from halo_pretrain.model import HaloSModel

SMALL = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_globals=2,
             local_window=6, dilated_offsets=None, num_random=2, max_seq_len=160)


def make_model(seed=0, **overrides) -> HaloSModel:
    torch.manual_seed(seed)
    model = HaloSModel(HaloConfig(**{**SMALL, **overrides}))
    for p in model.parameters():  # move off the init so the global slots and norms matter
        p.data.add_(0.05 * torch.randn_like(p))
    return model


def tokens(b, n, vocab=97, seed=1):
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["reference", "gather", "dense", "flex"])
def test_changing_later_tokens_leaves_earlier_logits_bit_identical(backend):
    model = make_model(attention=backend).eval()
    x = tokens(2, 90)
    y = x.clone()
    t = 57
    y[:, t + 1:] = tokens(2, 90 - t - 1, seed=9)
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.equal(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("backend", ["reference", "gather", "dense"])
def test_prefix_alone_gives_the_same_logits(backend):
    model = make_model(attention=backend).eval()
    x = tokens(1, 150)
    with torch.no_grad():
        full = model(x)
        for t in (0, 5, 6, 63, 149):
            alone = model(x[:, : t + 1])
            assert (alone[0, t] - full[0, t]).abs().max().item() <= 1e-5 * full[0, t].abs().max().item()


@pytest.mark.parametrize("backend", ["gather", "flex"])
def test_backends_agree_with_reference_on_outputs_and_every_parameter_gradient(backend):
    x = tokens(2, 101)
    results = {}
    for name in ("reference", backend):
        model = make_model(attention=name)
        if name == "flex":  # no CPU backward: compare the forward only
            with torch.no_grad():
                results[name] = (model(x), None)
            continue
        logits, loss = model(x, labels=torch.roll(x, -1, 1))
        loss.backward()
        results[name] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    ref_logits, ref_grads = results["reference"]
    logits, grads = results[backend]
    assert ((logits - ref_logits).norm() / ref_logits.norm()).item() <= 1e-5
    if grads is not None:
        assert set(grads) == set(ref_grads) and any("global_k" in n for n in grads)
        for n, g in grads.items():
            assert ref_grads[n].norm() > 0, n
            assert ((g - ref_grads[n]).norm() / ref_grads[n].norm()).item() <= 1e-5, n


def test_gqa_with_duplicated_kv_heads_equals_plain_multi_head_attention():
    gqa = make_model(num_kv_heads=2, attention="gather").eval()
    mha = HaloSModel(gqa.config.replace(num_kv_heads=4)).eval()
    state = gqa.state_dict()
    d = gqa.config.head_dim
    for key, value in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):  # [KV*d, hidden] -> each kv head serves 2 q heads
            state[key] = value.view(2, d, -1).repeat_interleave(2, 0).reshape(4 * d, -1)
        elif key.endswith(("global_k", "global_v")):
            state[key] = value.repeat_interleave(2, 0)
    mha.load_state_dict(state)
    x = tokens(2, 70)
    with torch.no_grad():
        assert torch.allclose(mha(x), gqa(x), atol=1e-5, rtol=1e-5)
    assert mha.config.num_kv_heads == mha.config.num_heads


def hand_count_parameters(c: HaloConfig) -> int:
    d = c.head_dim
    attention = c.hidden_size * c.num_heads * d * 2 + c.hidden_size * c.num_kv_heads * d * 2
    attention += 2 * c.num_kv_heads * c.num_globals * d
    mlp = (3 if c.use_swiglu else 2) * c.hidden_size * c.ffn_size
    per_layer = attention + mlp + 2 * c.hidden_size
    head = 0 if c.tie_embeddings else c.vocab_size * c.hidden_size
    return c.num_layers * per_layer + c.vocab_size * c.hidden_size + head + c.hidden_size


@pytest.mark.parametrize("preset", list(PRESETS))
def test_num_parameters_and_flops_match_hand_counts(preset):
    c = get_preset(preset)
    with torch.device("meta"):
        model = HaloSModel(c)
    assert model.num_parameters() == hand_count_parameters(c)
    # at seq_len <= W every key of the causal prefix is in the window: (n + 1) / 2 keys + G globals on average
    n = c.local_window
    matmul_params = hand_count_parameters(c) - c.num_layers * (2 * c.hidden_size + 2 * c.num_kv_heads * c.num_globals * c.head_dim) - c.hidden_size
    attention = 4 * c.num_layers * c.num_heads * c.head_dim * ((n + 1) / 2 + c.num_globals)
    assert model.flops_per_token(n, training=False) == pytest.approx(2 * matmul_params + attention, rel=1e-12)
    assert model.flops_per_token(n) == pytest.approx(3 * (2 * matmul_params + attention), rel=1e-12)


def test_sparse_flops_grow_linearly_and_dense_quadratically():
    c = get_preset("125m", max_seq_len=65536)
    with torch.device("meta"):
        sparse, dense = HaloSModel(c), HaloSModel(c.replace(attention="dense"))
    assert dense.num_parameters() == sparse.num_parameters()
    a4k, a64k = (sparse.flops_per_token(n) - sparse.flops_per_token(1) for n in (4096, 65536))
    assert a64k / a4k < 1.3  # keys per query: ~79 at 4k, ~83 at 64k
    d4k, d64k = (dense.flops_per_token(n) - dense.flops_per_token(1) for n in (4096, 65536))
    assert 15 < d64k / d4k < 17


def test_untied_head_and_gelu_variant_compute_their_own_function_and_count_their_parameters(tmp_path):
    """LayerNorm without bias, a tanh-GELU MLP with no gate and an untied head, spelled out from the weights
    (attention by the reference definition) against the model's forward."""
    import torch.nn.functional as F

    from halo_pretrain.attention import reference_attention

    model = make_model(tie_embeddings=False, use_swiglu=False, norm="layernorm").eval()
    c = model.config
    assert model.num_parameters() == hand_count_parameters(c)
    assert not hasattr(model.blocks[0].mlp, "gate_proj") and model.lm_head.weight is not model.embed.weight
    x = tokens(1, 120)
    n, d = x.shape[1], c.head_dim
    angles = torch.arange(n)[:, None] * c.rope_theta ** (-torch.arange(0, d, 2) / d)  # [N, D/2]

    def rope(t):  # rotate (first half, second half) pairs of each head by the position's angles
        a, b = t[..., : d // 2], t[..., d // 2:]
        return torch.cat([a * angles.cos() - b * angles.sin(), b * angles.cos() + a * angles.sin()], dim=-1)

    def norm(h, module):
        return F.layer_norm(h, (c.hidden_size,), module.weight, None, c.norm_eps)

    def heads(h, weight, count):
        return (h @ weight.T).view(1, n, count, d).transpose(1, 2)

    with torch.no_grad():
        h = model.embed.weight[x]
        for layer, block in enumerate(model.blocks):
            a, at = norm(h, block.attn_norm), block.attn
            q, k = rope(heads(a, at.q_proj.weight, c.num_heads)), rope(heads(a, at.k_proj.weight, c.num_kv_heads))
            v = heads(a, at.v_proj.weight, c.num_kv_heads)
            o = reference_attention(q, k, v, at.global_k, at.global_v, c, layer)
            h = h + o.transpose(1, 2).reshape(1, n, -1) @ at.o_proj.weight.T
            m = norm(h, block.mlp_norm)
            h = h + F.gelu(m @ block.mlp.up_proj.weight.T, approximate="tanh") @ block.mlp.down_proj.weight.T
        by_hand = norm(h, model.norm) @ model.lm_head.weight.T
        assert (model(x) - by_hand).abs().max().item() <= 1e-5
        model.save_pretrained(tmp_path)  # the untied head is saved and loaded as its own tensor
        loaded = HaloSModel.from_pretrained(tmp_path).eval()
        assert torch.equal(loaded.lm_head.weight, model.lm_head.weight) and torch.equal(loaded(x), model(x))


def test_save_pretrained_then_from_pretrained_gives_identical_logits(tmp_path):
    model = make_model(attention="gather").eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    loaded = HaloSModel.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    x = tokens(2, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_config_json_round_trip_and_unknown_fields_warn(tmp_path):
    c = get_preset("small", dilated_offsets=[100, 300], attention="dense")
    assert HaloConfig.from_json(c.to_json()) == c
    c.to_json(tmp_path / "c.json")
    assert HaloConfig.from_json(tmp_path / "c.json") == c
    with pytest.warns(UserWarning, match="future_field"):
        assert HaloConfig.from_dict({**c.to_dict(), "future_field": 1}) == c


def test_loss_ignores_minus_100_and_matches_cross_entropy():
    model = make_model(attention="gather")
    x = tokens(2, 30)
    labels = torch.roll(x, -1, 1)
    labels[:, -1] = -100
    logits, loss = model(x, labels=labels)
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97).float(), labels[:, :-1].reshape(-1))
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)


def test_chunked_loss_equals_the_full_loss_and_its_gradients():
    x = tokens(2, 50)
    labels = torch.roll(x, -1, 1)
    labels[0, 10:20] = -100
    full, chunked = make_model(attention="gather"), make_model(attention="gather")
    chunked.chunked_loss = lambda h, y: HaloSModel.chunked_loss(chunked, h, y, chunk_tokens=7)  # 100 tokens: 15 chunks
    _, loss_full = full(x, labels=labels)
    none, loss_chunked = chunked(x, labels=labels, return_logits=False)
    assert none is None
    assert loss_chunked.item() == pytest.approx(loss_full.item(), rel=1e-6)
    loss_full.backward()
    loss_chunked.backward()
    for (n, a), b in zip(full.named_parameters(), chunked.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), n


@pytest.mark.parametrize("field, value, words", [
    ("hidden_size", 30, "divisible by num_heads"),
    ("num_kv_heads", 3, "divisible by num_kv_heads"),
    ("local_window", 0, "local_window"),
    ("dilated_offsets", [0, 8], "dilated_offsets"),
    ("dilated_offsets", [64, 32], "strictly increasing"),
    ("dilated_offsets", [32, 32], "strictly increasing"),
    ("attention", "sparse", "unknown backend"),
])
def test_impossible_configs_name_the_field_and_value(field, value, words):
    with pytest.raises(ValueError, match=words) as err:
        HaloConfig(**{**SMALL, field: value})
    assert str(value) in str(err.value)


def test_sequence_longer_than_max_seq_len_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="max_seq_len=160"):
        model(tokens(1, 161))


@pytest.mark.parametrize("bad", [97, 1000, -1])
def test_token_ids_outside_the_vocabulary_raise_a_clear_error(bad):
    model = make_model()
    x = tokens(1, 10)
    x[0, 3] = bad
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary \[0, 97\)"):
        model(x)


def test_backend_unavailable_on_this_device_is_a_value_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="attention='triton'"):
        make_model(attention="triton")(tokens(1, 10))
    with pytest.raises(ValueError, match="attention='flex'"):
        make_model(attention="flex")(tokens(1, 10))  # grad enabled: FlexAttention has no CPU backward


def test_auto_picks_gather_on_cpu():
    from halo_pretrain.attention import resolve_backend

    assert resolve_backend("auto", "cpu") == "gather"
