"""Paged attention against a dense NumPy reference, and a model step through the pool
against a plain causal forward pass.

The reference gathers each sequence's keys and values position by position through its
block table and runs softmax attention over them; nothing of model/nn/attention.py's
chunking, online softmax or block layout is shared with it.
"""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import kernels
from model.nn.attention import (
    Layout,
    Pool,
    decode_attention,
    init_pool,
    kernel_fits,
    region_attention,
)

K, G, H, BS = 2, 3, 8, 4  # GQA: 3 query heads per kv head
NB, MB = 64, 24  # pool blocks; blocks per sequence (96 positions)


def random_pool(rng, nb=NB, bs=BS, h=H, dtype=np.float32) -> tuple[Pool, np.ndarray, np.ndarray]:
    """A pool of random keys and values in `dtype`, and the same values as dense float32
    [NB·BS, K, H] arrays."""
    keys = rng.standard_normal((nb * bs, K, h)).astype(dtype).astype(np.float32)
    values = rng.standard_normal((nb * bs, K, h)).astype(dtype).astype(np.float32)
    k = keys.reshape(nb, bs, K, h).transpose(0, 2, 3, 1).astype(dtype)  # [NB, K, H, BS]
    v = values.reshape(nb, bs, K, h).transpose(0, 2, 1, 3).astype(dtype)  # [NB, K, BS, H]
    return Pool(jnp.asarray(k), jnp.asarray(v)), keys, values


def sequence_positions(table: np.ndarray, length: int, bs=BS) -> np.ndarray:
    """Flat pool positions of a sequence's first `length` positions."""
    pos = np.arange(length)
    return table[pos // bs] * bs + pos % bs


def reference(q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Softmax attention of q [Q, K, G, H] over keys, values [S, K, H] → [Q, K, G, H]."""
    scores = np.einsum("qkgh,skh->qkgs", q, keys) / np.sqrt(q.shape[-1])
    scores -= scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("qkgs,skh->qkgh", probs, values)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.mark.parametrize("chunk", [8, 128])
@pytest.mark.parametrize("shared", [False, True], ids=["own-tables", "one-table"])
def test_decode_rows_equal_the_dense_reference(rng, chunk, shared):
    """Rows at mixed lengths (block boundaries, one position, one idle row) over
    shuffled blocks, with loop chunks smaller and larger than a sequence; each row with a
    table of its own, or (one sequence and its drafts) every active row with the same
    table, which is gathered once."""
    cache, keys, values = random_pool(rng)
    contexts = np.array([0, 3, 4, 5, 31, 63, 95, -1], np.int32)  # key positions 0..context
    rows = len(contexts)
    tables = np.stack([rng.permutation(NB)[:MB] for _ in range(rows)]).astype(np.int32)
    if shared:
        tables[:-1] = tables[0]  # the idle last row's table does not count
    q = rng.standard_normal((rows, K, G, H)).astype(np.float32)
    out = np.asarray(
        jax.jit(decode_attention, static_argnums=(5, 6))(
            jnp.asarray(q), cache, jnp.asarray(contexts), jnp.asarray(tables), 0, chunk, chunk
        )
    )
    for r, context in enumerate(contexts):
        if context < 0:
            np.testing.assert_array_equal(out[r], 0)
            continue
        flat = sequence_positions(tables[r], context + 1)
        expected = reference(q[r : r + 1], keys[flat], values[flat])[0]
        np.testing.assert_allclose(out[r], expected, atol=1e-5)


@pytest.mark.usefixtures("vectors")
@pytest.mark.parametrize("h", [16, 64])
@pytest.mark.parametrize("long", [False, True], ids=["one-thread", "threads"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_the_cpu_kernel_equals_the_dense_reference(rng, h, long, dtype):
    """jaxchat's CPU decode attention (model/kernels/attention.cc), which reads the blocks
    in place: rows ending inside and at the edges of blocks, one position, an idle row,
    the layer's blocks at an offset (`base`), two rows sharing a table; long contexts
    split the work among threads (a row's kv heads together in a step of 8 rows, each kv
    head on its own in a step of 1 or 3). A row's output is the same to the bit in a
    step of its own, of 3 rows, or of 8. A float16 pool is read as its values."""
    assert kernels.load(), "the kernels are built by `make setup` (python -m model.kernels)"
    bs, nb, mb, base = 16, 160, 96 if long else 12, 7
    pool, keys, values = random_pool(rng, nb + base, bs, h, dtype)
    assert kernel_fits(pool, h)
    longest = mb * bs - 1
    contexts = np.array([0, 15, 16, 17, longest // 2, longest, -1, longest], np.int32)
    tables = np.stack([rng.permutation(nb)[:mb] for _ in contexts]).astype(np.int32)
    tables[-1] = tables[-3]
    q = rng.standard_normal((len(contexts), K, G, h)).astype(np.float32)
    attend = jax.jit(decode_attention, static_argnames="kernel")
    out = np.asarray(attend(q, pool, contexts, tables, base, kernel=True))
    for r, context in enumerate(contexts):
        if context < 0:
            np.testing.assert_array_equal(out[r], 0)
            continue
        flat = sequence_positions(tables[r] + base, context + 1, bs)
        expected = reference(q[r : r + 1], keys[flat], values[flat])[0]
        np.testing.assert_allclose(out[r], expected, atol=2e-6)
    for rows in ([r] for r in range(len(contexts))), [[4, 5, 6]]:
        for picked in rows:
            alone = attend(q[picked], pool, contexts[picked], tables[picked], base, kernel=True)
            np.testing.assert_array_equal(np.asarray(alone), out[picked])
    # The XLA path on the same inputs (no kernel) agrees to rounding.
    xla = np.asarray(attend(q, pool, contexts, tables, base, kernel=False))
    np.testing.assert_allclose(out, xla, atol=2e-6)


# Each of the region's three segments' prior group (-1: it starts at position 0).
SEES = {
    "one": [0, -1, -1],  # a later chunk, or a cached prefix
    "shared": [0, 0, -1],  # two prompts after the same cached blocks
    "two": [1, -1, 0],  # two priors (group numbers need not follow the segments)
}


@pytest.mark.parametrize("prior", [0, 1, 17, 40])
@pytest.mark.parametrize("chunk", [8, 1024])
@pytest.mark.parametrize("sees", list(SEES))
def test_prefill_segments_equal_the_dense_reference(rng, prior, chunk, sees):
    """Three segments in one region, padding: some after pooled positions (their prior
    group's), the rest from position 0; a group no token sees changes nothing."""
    check_region(rng, prior, SEES[sees], chunk=chunk)


@pytest.mark.usefixtures("vectors")
@pytest.mark.parametrize("prior", [0, 1, 17, 300, 700])
@pytest.mark.parametrize("sees", list(SEES))
@pytest.mark.parametrize("h", [16, 64])
@pytest.mark.parametrize("first", [5, 1])
def test_the_cpu_kernels_prior_attention_equals_the_dense_reference(rng, prior, sees, h, first):
    """The region's attention over pooled priors through jaxchat's CPU kernel
    (prompt_attention.cc's prior attention): priors inside and across its 256-position
    spans and 16-position blocks; a kv head's queries in full and part-filled tiles (a
    first segment of one token: its group's 3 query heads, one tile over a prior split
    among the cores); two groups in one call; the layer's blocks at an offset."""
    assert kernels.load(), "the kernels are built by `make setup` (python -m model.kernels)"
    check_region(rng, prior, SEES[sees], bs=16, h=h, nb=64, mb=48, base=5, kernel=True, first=first)


@pytest.mark.parametrize("prior", [17, 300])
@pytest.mark.parametrize("kernel", [False, True], ids=["xla", "kernel"])
def test_a_float16_pools_prior_is_read_as_its_values(rng, prior, kernel):
    """A float16 pool's keys and values, through XLA and through the CPU kernel (which widens
    each piece it reads), against the dense reference on the same values."""
    assert kernels.load(), "the kernels are built by `make setup` (python -m model.kernels)"
    check_region(
        rng, prior, SEES["two"], bs=16, h=64, nb=64, mb=48, base=5, kernel=kernel, dtype=np.float16
    )


def check_region(
    rng,
    prior,
    sees,
    chunk=1024,
    bs=BS,
    h=H,
    nb=NB,
    mb=MB,
    base=0,
    kernel=False,
    first=5,
    dtype=np.float32,
) -> None:
    cache, keys, values = random_pool(rng, nb + base, bs, h, dtype)
    lengths = [first, 9, 3]
    pad = 3
    segments = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)] + [np.full(pad, -1)])
    # Group 0 has `prior` positions, group 1 fewer, group 2 some that no token sees.
    priors = np.array([prior, prior // 2 + 3, 11], np.int32)
    tables = np.stack([rng.permutation(nb)[:mb] for _ in priors]).astype(np.int32)
    starts = [priors[g] if g >= 0 else 0 for g in sees]
    positions = np.concatenate(
        [np.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)] + [np.zeros(pad)]
    ).astype(np.int32)
    group = np.asarray([sees[g] if g >= 0 else -1 for g in segments], np.int32)
    p = len(segments)
    q = rng.standard_normal((p, K, G, h)).astype(np.float32)
    key = rng.standard_normal((p, K, h)).astype(np.float32)
    value = rng.standard_normal((p, K, h)).astype(np.float32)
    layout = Layout(
        positions=jnp.asarray(positions),
        context=jnp.zeros((0,), jnp.int32),
        block_tables=jnp.zeros((0, mb), jnp.int32),
        segments=jnp.asarray(segments, jnp.int32),
        prior=jnp.asarray(priors),
        prior_blocks=jnp.asarray(tables),
        prior_group=jnp.asarray(np.where(segments >= 0, group, 7)),  # padding's is ignored
        write=jnp.zeros((p,), jnp.int32),
    )
    out = jax.jit(region_attention, static_argnames=("prior_chunk", "kernel"))(
        jnp.asarray(q.transpose(1, 2, 3, 0)),  # [K, G, H, P]
        jnp.asarray(key.transpose(1, 2, 0)),  # [K, H, P]
        jnp.asarray(value.transpose(1, 2, 0)),
        layout,
        cache,
        base,
        prior_chunk=chunk,
        kernel=kernel,
    )
    out = np.asarray(out).transpose(3, 0, 1, 2)  # [P, K, G, H]
    for t in range(p):
        seg = segments[t]
        if seg < 0:
            continue
        mine = np.flatnonzero((segments == seg) & (positions <= positions[t]))
        ks, vs = key[mine], value[mine]
        if group[t] >= 0:
            pooled = sequence_positions(tables[group[t]] + base, priors[group[t]], bs)
            ks = np.concatenate([keys[pooled], ks])
            vs = np.concatenate([values[pooled], vs])
        np.testing.assert_allclose(out[t], reference(q[t : t + 1], ks, vs)[0], atol=1e-5)


def test_a_layout_uses_the_tokens_up_to_its_last_real_one():
    """`Layout.used`: decode rows up to the last with a context, then prefill tokens up to
    the last with a segment; padding after them is not counted, idle rows before are."""

    def used(context, segments) -> int:
        layout = Layout.host(
            positions=np.zeros(len(context) + len(segments), np.int32),
            context=np.asarray(context, np.int32),
            block_tables=np.zeros((len(context), 1), np.int32),
            segments=np.asarray(segments, np.int32),
            prior=np.zeros(1, np.int32),
            prior_blocks=np.zeros((1, 1), np.int32),
            prior_group=np.full(len(segments), -1, np.int32),
            write=np.zeros(len(context) + len(segments), np.int32),
        )
        return int(jax.jit(Layout.used)(layout))

    assert used([-1, 7, -1, -1], [0, 0, 1, -1, -1]) == 7
    assert used([-1, 7, -1, -1], [-1, -1]) == 2
    assert used([4, -1, -1, 9], []) == 4
    assert used([-1] * 4, [-1] * 3) == 0
    assert used([], [0, 0, -1]) == 2


def resident_bytes() -> int:
    """This process's resident memory (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_the_kernels_pool_is_zero_and_costs_memory_as_it_is_written():
    """A pool zeroed by jaxchat's CPU kernel (model/kernels/pool.cc) reads as zeros, the
    partial pages at its ends included, and the process does not grow by its size until
    it is written: writing a block (in place, as a step does) costs that block's pages."""
    assert kernels.load(), "the kernels are built by `make setup` (python -m model.kernels)"
    layers, blocks, bs, kv, h = 3, 30001, 16, 3, 16  # 2 x 276 MB, not whole pages
    make = jax.jit(lambda: init_pool(layers, blocks, bs, kv, h, jnp.float32, kernel=True))
    make.lower().compile()  # the compiler's own memory is not the pool's
    before = resident_bytes()
    pool = jax.block_until_ready(make())
    grown = resident_bytes() - before
    assert pool.k.shape == (layers * blocks, kv, h, bs) and pool.v.shape == (
        layers * blocks,
        kv,
        bs,
        h,
    )
    assert grown < 32 << 20, f"the pool's pages were touched: {grown >> 20} MiB resident"
    address = pool.k.unsafe_buffer_pointer()
    write = jax.jit(lambda p: p.replace(k=p.k.at[7].set(1.0)), donate_argnums=0)
    pool = jax.block_until_ready(write(pool))
    assert pool.k.unsafe_buffer_pointer() == address  # updated in place
    k, v = np.asarray(pool.k), np.asarray(pool.v)
    assert np.count_nonzero(k) == kv * h * bs and np.all(k[7] == 1.0)
    assert np.count_nonzero(v) == 0


# Blocks of 16 positions; the cuts leave 1 to 599 tokens (up to 5, a kv head's queries are
# one tile of up to 16: K, G = 2, 3).
CUTS = [(600, c, 16) for c in (1, 15, 16, 17, 255, 256, 257, 300, 595, 599)]
# Past 1,024 positions a token's keys are taken in chunks whose softmax states are merged;
# a few tokens left after the cut are shared out a chunk at a time, many a token at a time.
# Blocks of 64 (the engine's).
LONG_CUTS = [(2100, c, 64) for c in (1023, 1024, 1025, 2096, 2099)]


@pytest.mark.parametrize("length,cut,bs", CUTS + LONG_CUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_the_cpu_kernels_prompt_attention_is_the_same_to_the_bit_however_the_prompt_is_cut(
    rng, length, cut, bs, dtype
):
    """A prompt in one region, and cut at `cut`: its first positions in the pool (a prior
    group: an earlier chunk, or a cached prefix), the rest in a region behind another
    prompt's segment. Each token's output is the same to the bit: the kernel's softmax runs
    over the same spans of positions from 0, in the same order, wherever its keys lie (cuts
    inside and at its 16-position lanes, 256-position spans and 1,024-position chunks)."""
    assert kernels.load(), "the kernels are built by `make setup` (python -m model.kernels)"
    h = 64
    mb = -(-length // bs)
    nb = mb + 8
    pool, keys, values = random_pool(rng, nb, bs, h, dtype)  # (the region's: the same values)
    table = rng.permutation(nb)[:mb].astype(np.int32)
    flat = sequence_positions(table, length, bs)
    q = rng.standard_normal((length, K, G, h)).astype(np.float32)
    other = 5  # another prompt's segment first in the region, from position 0

    def attend(prior: int) -> np.ndarray:
        own = np.arange(prior, length)
        p = other + len(own) + 3  # 3 of padding
        segments = np.concatenate([np.zeros(other), np.ones(len(own)), np.full(3, -1)])
        positions = np.concatenate([np.arange(other), own, np.zeros(3)])
        group = np.where(segments == 1, 0 if prior else -1, -1)
        picked = np.concatenate([flat[:other], flat[own], flat[:3]])
        queries = np.concatenate([q[:other], q[own], q[:3]])
        layout = Layout(
            positions=jnp.asarray(positions, jnp.int32),
            context=jnp.zeros((0,), jnp.int32),
            block_tables=jnp.zeros((0, mb), jnp.int32),
            segments=jnp.asarray(segments, jnp.int32),
            prior=jnp.asarray([prior, 0], jnp.int32),
            prior_blocks=jnp.asarray(np.stack([table, table])),
            prior_group=jnp.asarray(group, jnp.int32),
            write=jnp.zeros((p,), jnp.int32),
        )
        out = jax.jit(region_attention, static_argnames="kernel")(
            jnp.asarray(queries.transpose(1, 2, 3, 0)),
            jnp.asarray(keys[picked].transpose(1, 2, 0)),
            jnp.asarray(values[picked].transpose(1, 2, 0)),
            layout,
            pool,
            kernel=True,
        )
        return np.asarray(out).transpose(3, 0, 1, 2)[other : other + len(own)]  # [P, K, G, H]

    whole = attend(0)
    np.testing.assert_allclose(whole[-1], reference(q[-1:], keys[flat], values[flat])[0], atol=1e-5)
    np.testing.assert_array_equal(attend(cut), whole[cut:])


@pytest.mark.parametrize("way", [0, 1, 2], ids=["avx512", "f16c", "scalar"])
def test_every_way_of_widening_a_float16_pool_is_exact(way):
    """All 65,536 float16 values, widened by each of the kernels' ways that this CPU has
    (the attention kernels pick the widest at load): each the exact float32 value, signed
    zeros, subnormals and infinities to the bit, NaN as NaN."""
    assert kernels.load(), "the kernels are built by `make setup` (python -m model.kernels)"
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    out = kernels.widen(way, halves)
    if out is None:
        pytest.skip("this CPU lacks that conversion")
    exact = halves.astype(np.float32)
    nan = np.isnan(exact)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out[~nan].view(np.uint32), exact[~nan].view(np.uint32))
