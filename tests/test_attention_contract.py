"""The neighbour set and every CPU backend against the contract in docs/attention.md."""

import random
import subprocess
import sys

import pytest
import torch

from halo_pretrain.attention import gather_attention, neighbor_index, reference_attention, token_mask
from halo_pretrain.attention.dense import dense_attention
from halo_pretrain.attention.flex import flex_attention_halo
from halo_pretrain.attention.neighbors import keys_per_query, layer_key, mean_keys_per_query, random_target
from halo_pretrain.config import HaloConfig


def brute_force_neighbours(n: int, config: HaloConfig, layer: int) -> list[set[int]]:
    """The contract's rules, read literally, one query at a time."""
    w = config.local_window
    key = layer_key(config.seed, layer)
    out = []
    for q in range(n):
        keys = {k for k in range(q - w + 1, q + 1) if k >= 0}
        keys |= {q - d for d in config.offsets if d <= q}
        if q >= w:
            keys |= {random_target(key, q, slot, w) for slot in range(config.num_random)}
        assert all(0 <= k <= q for k in keys)
        out.append(keys)
    return out


def random_config(rng: random.Random) -> HaloConfig:
    w = rng.randint(1, 12)
    offsets = sorted(rng.sample(range(1, 90), rng.randint(0, 5))) if rng.random() < 0.7 else None
    return HaloConfig(
        hidden_size=32, num_heads=4, num_kv_heads=rng.choice([1, 2, 4]), num_globals=rng.randint(0, 3),
        local_window=w, dilated_offsets=offsets, num_random=rng.randint(0, 4), max_seq_len=rng.choice([64, 100, 257]),
        seed=rng.randint(0, 2**31),
    )


@pytest.mark.parametrize("trial", range(12))
def test_neighbour_set_equals_brute_force(trial):
    rng = random.Random(trial)
    config = random_config(rng)
    n = rng.choice([1, 7, 33, 61, 97])
    layer = rng.randint(0, 5)
    expected = brute_force_neighbours(n, config, layer)
    mask = token_mask(n, config, layer)
    got = [set(torch.nonzero(mask[q]).flatten().tolist()) for q in range(n)]
    assert got == expected
    # each valid slot of the index form names a distinct key: the set, each key once
    index, valid = neighbor_index(n, config, layer)
    for q in range(n):
        keys = index[q][valid[q]].tolist()
        assert len(keys) == len(set(keys)) and set(keys) == expected[q]
    assert keys_per_query(n, config, layer).tolist() == [len(s) + config.num_globals for s in expected]


def test_default_offsets_are_powers_of_two_times_window_below_max_len():
    config = HaloConfig(local_window=64, max_seq_len=65536)
    assert config.offsets == [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    assert HaloConfig(local_window=64, max_seq_len=128).offsets == []


def test_random_edges_reach_past_window_and_differ_by_layer_and_seed():
    config = HaloConfig(local_window=8, num_random=2, dilated_offsets=[], max_seq_len=512)
    n = 400
    m0, m1 = token_mask(n, config, 0), token_mask(n, config, 1)
    m0_other_seed = token_mask(n, config.replace(seed=1), 0)
    far = torch.ones(n, n, dtype=torch.bool).tril(-config.local_window)
    assert (m0 & far).sum(1)[config.local_window:].min() >= 1  # every q >= W has a long-range key
    assert not torch.equal(m0, m1) and not torch.equal(m0, m0_other_seed)
    assert torch.equal(m0, token_mask(n, config, 0))  # a pure function


def test_same_seed_same_edges_in_a_new_process():
    code = (
        "import torch;from halo_pretrain.config import HaloConfig;"
        "from halo_pretrain.attention import neighbor_index;"
        "i,v=neighbor_index(300,HaloConfig(local_window=16,num_random=3,max_seq_len=512,seed=7),3);"
        "print((i*v).sum().item(), (i*v*torch.arange(300)[:,None]).sum().item())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    i, v = neighbor_index(300, HaloConfig(local_window=16, num_random=3, max_seq_len=512, seed=7), 3)
    assert [int(x) for x in out] == [(i * v).sum().item(), (i * v * torch.arange(300)[:, None]).sum().item()]


def random_qkv(config: HaloConfig, b: int, n: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, kv, d, glb = config.num_heads, config.num_kv_heads, config.head_dim, config.num_globals
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(b, h, n, d), mk(b, kv, n, d), mk(b, kv, n, d), mk(kv, glb, d), mk(kv, glb, d)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("trial", range(6))
def test_gather_matches_reference_outputs_and_all_gradients(trial):
    rng = random.Random(100 + trial)
    config = random_config(rng)
    n = rng.choice([5, 40, 77])
    inputs = random_qkv(config, 2, n, torch.float32, seed=trial)
    outs, grads = [], []
    for fn in (reference_attention, gather_attention):
        for t in inputs:
            t.grad = None
        out = fn(*inputs, config, layer=trial)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in inputs])
    assert rel(outs[1], outs[0]) <= 1e-5
    for g_gather, g_ref in zip(grads[1], grads[0]):
        if g_ref.numel():
            assert rel(g_gather, g_ref) <= 1e-5


def test_flex_forward_matches_reference_on_cpu():
    config = HaloConfig(hidden_size=64, num_heads=4, num_kv_heads=2, num_globals=3, local_window=5, num_random=3,
                        max_seq_len=100, dilated_offsets=[3, 7, 12, 40])
    q, k, v, gk, gv = (t.detach().float() for t in random_qkv(config, 2, 67))
    with torch.no_grad():
        ref = reference_attention(q.double(), k.double(), v.double(), gk.double(), gv.double(), config, 2)
        out = flex_attention_halo(q, k, v, gk, gv, config, 2)
    assert rel(out.double(), ref) <= 1e-5


def test_dense_is_full_causal_attention_with_the_global_slots():
    config = HaloConfig(hidden_size=64, num_heads=4, num_kv_heads=2, num_globals=2, max_seq_len=64)
    full = config.replace(local_window=64, dilated_offsets=[], num_random=0)
    inputs = random_qkv(config, 2, 50)
    assert rel(dense_attention(*inputs, config, 0), reference_attention(*inputs, full, 0)) <= 1e-12


def test_reference_works_in_float64_and_sums_to_one_over_the_set():
    config = HaloConfig(hidden_size=32, num_heads=2, num_kv_heads=2, num_globals=2, local_window=4, max_seq_len=64)
    q, k, _, gk, _ = random_qkv(config, 1, 30)
    ones_v = torch.ones(1, 2, 30, 16, dtype=torch.float64)
    ones_gv = torch.ones(2, 2, 16, dtype=torch.float64)
    out = reference_attention(q, k, ones_v, gk, ones_gv, config, 0)  # convex weights over the keys -> all ones
    assert out.dtype == torch.float64 and torch.allclose(out, torch.ones_like(out), atol=1e-12)


def test_mean_keys_per_query_counts_the_neighbour_set():
    config = HaloConfig(num_layers=3, local_window=8, num_random=2, num_globals=4, max_seq_len=256)
    n = 200
    exact = sum(len(s) for layer in range(3) for s in brute_force_neighbours(n, config, layer)) / (3 * n) + 4
    assert mean_keys_per_query(n, config) == pytest.approx(exact, rel=1e-12)
    assert mean_keys_per_query(n, config.replace(attention="dense")) == (n + 1) / 2 + 4
