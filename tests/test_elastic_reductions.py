"""The building blocks of layout invariance, each checked across device counts: fixed-order sums,
per-example dropout keys, checksums, and executables retargeted to another device set."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxsys.train import objective
from jaxsys.train.elastic import canonical
from jaxsys.train.elastic.compile import ExecutableCache, retarget
from jaxsys.train.elastic.layout import ceil_div


def _sumsq_on(x: np.ndarray, n: int, chunk: int) -> np.float32:
    P = x.shape[0]
    S = ceil_div(P, n)
    plan = canonical.NormPlan.make(P, n, S, chunk)
    mesh = canonical.layout_mesh(jax.devices()[:n])
    f = jax.jit(jax.shard_map(lambda v: canonical.canonical_sumsq(v, plan, n)[None], mesh=mesh,
                              in_specs=PartitionSpec(canonical.layout_axis()), out_specs=PartitionSpec(),
                              check_vma=False))
    xs = jax.device_put(np.pad(x, (0, n * S - P)), NamedSharding(mesh, PartitionSpec(canonical.layout_axis())))
    return np.asarray(f(xs))[0]


@pytest.mark.parametrize("chunk", [64, 4096])
def test_canonical_norm_is_the_same_bits_on_any_device_count(chunk):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(3001) * np.exp(rng.uniform(-8, 8, 3001))).astype(np.float32)
    got = {n: _sumsq_on(x, n, chunk) for n in (8, 7, 3, 1)}
    assert len({v.tobytes() for v in got.values()}) == 1, got
    np.testing.assert_allclose(got[1], np.sum(x.astype(np.float64) ** 2), rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 8, 13])
def test_tree_sum_fixed_order(n):
    """Pad to the next power of two with zeros, then halve: x[:h] + x[h:]."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 7)).astype(np.float32)
    p2 = 1
    while p2 < n:
        p2 *= 2
    ref = np.concatenate([x, np.zeros((p2 - n, 7), np.float32)])
    while ref.shape[0] > 1:
        h = ref.shape[0] // 2
        ref = ref[:h] + ref[h:]
    assert np.array_equal(np.asarray(jax.jit(canonical.tree_sum)(x)), ref[0])


def test_dropout_masks_do_not_depend_on_the_device_count():
    """Keys fold_in(fold_in(root, step), example) computed on 8, 6 or 1 devices give the same
    masks; and an example's forward output does not depend on its position in the batch."""
    B, T, D = 48, 8, 16
    ids = np.arange(1000, 1000 + B, dtype=np.int32)

    def masks(ids_B):
        keys = objective.example_keys(jax.random.key(0), jnp.int32(7), ids_B)
        return jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 3), 0.9, (T, D)))(keys)

    out = []
    for n in (8, 6, 1):
        mesh = canonical.layout_mesh(jax.devices()[:n])
        s = NamedSharding(mesh, PartitionSpec(canonical.layout_axis()))
        out.append(np.asarray(jax.jit(masks, in_shardings=s, out_shardings=s)(ids)))
    assert all(np.array_equal(out[0], o) for o in out[1:])
    assert 0.85 < out[0].mean() < 0.95

    from jaxsys.train.config import load_config
    from jaxsys.train.program import init_params_f32

    cfg = load_config("tiny", ["model.num_layers=1"])
    params = jax.tree.map(jnp.asarray, init_params_f32(cfg))
    tokens = np.random.default_rng(0).integers(0, 256, (4, 9)).astype(np.int32)
    ex = np.array([5, 6, 7, 8], np.int32)

    @jax.jit
    def per_example(tok, ex_ids, step):
        keys = objective.example_keys(jax.random.key(0), step, ex_ids)
        return jax.vmap(lambda t, k: objective.lm_loss_sum(params, t[None], k[None], cfg=cfg.model,
                                                           dropout=0.5))(tok, keys)

    a = np.asarray(per_example(tokens, ex, 3))
    perm = np.array([2, 0, 3, 1])
    b = np.asarray(per_example(tokens[perm], ex[perm], 3))
    assert np.array_equal(a[perm], b)
    assert not np.any(a == np.asarray(per_example(tokens, ex, 4)))  # masks change with the step


def test_checksum_catches_every_single_bit_flip():
    x = np.random.default_rng(2).standard_normal(257).astype(np.float32)

    @jax.jit
    def ck(v):
        bits = canonical.as_bits(v)
        return canonical.checksum(bits, jnp.arange(bits.shape[0], dtype=jnp.uint32))

    base = np.asarray(ck(x))
    bits = x.view(np.uint32)
    for idx in (0, 1, 128, 256):
        for bit in range(32):
            y = bits.copy()
            y[idx] ^= np.uint32(1 << bit)
            assert not np.array_equal(np.asarray(ck(y.view(np.float32))), base), (idx, bit)
    # integer sums are order-free: a permuted layout with the same positions gives the same value
    perm = np.random.default_rng(3).permutation(257)
    pos = np.arange(257, dtype=np.uint32)
    got = np.asarray(jax.jit(canonical.checksum)(bits[perm], pos[perm]))
    assert np.array_equal(got, base)


def _program(devices):
    n = len(devices)
    mesh = canonical.layout_mesh(devices)
    s = NamedSharding(mesh, PartitionSpec(canonical.layout_axis()))

    def body(x):
        nxt = jax.lax.ppermute(x, canonical.layout_axis(), [(i, (i + 1) % n) for i in range(n)])
        return x * 2 + nxt + jax.lax.axis_index(canonical.layout_axis()).astype(x.dtype)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec(canonical.layout_axis()),
                              out_specs=PartitionSpec(canonical.layout_axis())), in_shardings=s, out_shardings=s)
    return f, (jax.ShapeDtypeStruct((4 * n,), jnp.float32, sharding=s),)


def test_retargeted_executable_runs_on_the_new_devices():
    devs = jax.devices()
    a, b = devs[:4], [devs[i] for i in (7, 2, 5, 4)]
    fa, args = _program(a)
    exe_a = fa.lower(*args).compile()
    exe_b = retarget(exe_a, a, b)
    fb, args_b = _program(b)
    x = jax.device_put(np.arange(16, dtype=np.float32), args_b[0].sharding)
    out = exe_b(x)
    assert [s.device for s in sorted(out.addressable_shards, key=lambda s: s.index[0].start)] == b
    assert np.array_equal(np.asarray(out), np.asarray(fb(x)))
    with pytest.raises(ValueError):
        exe_b(jax.device_put(np.arange(16, dtype=np.float32), args[0].sharding))  # wrong devices

    cache = ExecutableCache()
    cache.get("p", 0, a, _program)
    cache.get("p", 0, b, _program)
    cache.get("p", 0, b, _program)
    assert [r.how for r in cache.records] == ["compiled", "retargeted"]
    fut = cache.background(lambda: cache.get("p", 0, devs[:2], _program))
    cache.wait()
    assert fut.done() and cache.records[-1].how == "compiled" and cache.has_size("p", 0, 2)
    # single-device programs (transfer pieces) are compiled for each device, never retargeted
    cache.get("p", 0, devs[:1], _program)
    cache.get("p", 0, devs[1:2], _program)
    assert [r.how for r in cache.records[-2:]] == ["compiled", "compiled"]
