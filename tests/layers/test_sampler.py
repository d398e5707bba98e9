"""The on-device sampler (jllm/layers/sampler.py) against a plain numpy reference.

Every test draws fresh random logits (a per-test seeded generator) and batches rows
with different per-row parameters, so per-row broadcasting bugs show up. The
reference follows VLLM_BEHAVIOUR.md 2.2: whitelist -> bans -> logit_bias ->
repetition -> frequency -> presence; then temperature -> min_p -> top-k -> top-p.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jllm.layers.sampler import (
    SamplingMetadata,
    apply_logits_processors,
    apply_min_p,
    apply_top_k_top_p,
    compute_logprobs,
    sample,
)

NEG_INF = -np.inf


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def rng(request) -> np.random.Generator:
    """Fresh logits per test, reproducible across runs."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _pad(rows: list[list[int] | None], num_rows: int, fill=-1, dtype=np.int32, width=None) -> np.ndarray:
    rows = [list(r or []) for r in rows] + [[]] * (num_rows - len(rows))
    if width is None:
        width = max((len(r) for r in rows), default=0)
    out = np.full((num_rows, width), fill, dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


@dataclasses.dataclass
class Row:
    """One request's sampling parameters (the numpy reference reads these)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    step: int = 0
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    prompt: list[int] | None = None
    output: list[int] | None = None
    bias: dict[int, float] | None = None
    banned: list[int] | None = None
    allowed: list[int] | None = None


def make_md(rows: list[Row], *, width: int | None = None) -> SamplingMetadata:
    """numpy SamplingMetadata the way input_batch builds it: optional parts have width 0
    when no row uses them; penalty rows get an output list of at least [-1]. A fixed
    `width` pads every id list to it instead (one compiled shape for several batches)."""
    S = len(rows)
    f32 = lambda name: np.asarray([getattr(r, name) for r in rows], np.float32)  # noqa: E731
    penalties = width is not None or any(r.presence or r.frequency or r.repetition != 1.0 for r in rows)
    if penalties:
        prompt = _pad([r.prompt for r in rows], S, width=width)
        output = _pad([r.output or [-1] for r in rows], S, width=width)
    else:
        prompt = output = np.zeros((S, 0), np.int32)
    bias = [sorted((r.bias or {}).items()) for r in rows]
    return SamplingMetadata(
        temperature=f32("temperature"),
        top_k=np.asarray([r.top_k for r in rows], np.int32),
        top_p=f32("top_p"),
        min_p=f32("min_p"),
        seed_hi=np.asarray([(r.seed >> 32) & 0xFFFFFFFF for r in rows], np.uint32),
        seed_lo=np.asarray([r.seed & 0xFFFFFFFF for r in rows], np.uint32),
        step=np.asarray([r.step for r in rows], np.int32),
        presence_penalty=f32("presence"),
        frequency_penalty=f32("frequency"),
        repetition_penalty=f32("repetition"),
        prompt_token_ids=prompt,
        output_token_ids=output,
        bias_token_ids=_pad([[t for t, _ in b] for b in bias], S, width=width),
        bias_values=_pad([[v for _, v in b] for b in bias], S, 0.0, np.float32, width=width),
        banned_token_ids=_pad([r.banned for r in rows], S, width=width),
        allowed_token_ids=_pad([r.allowed for r in rows], S, width=width),
        has_allowed=np.asarray([bool(r.allowed) for r in rows], bool),
    )


# ----------------------------------------------------------------- numpy reference


def ref_processors(logits: np.ndarray, rows: list[Row]) -> np.ndarray:
    out = logits.astype(np.float64).copy()
    V = out.shape[1]
    for i, r in enumerate(rows):
        x = out[i]
        if r.allowed:
            keep = np.zeros(V, bool)
            keep[r.allowed] = True
            x[~keep] = NEG_INF
        if r.banned:
            x[r.banned] = NEG_INF
        for t, b in (r.bias or {}).items():
            x[t] += b
        out_tokens = list(r.output or [])
        counts = np.bincount(np.asarray(out_tokens, np.int64), minlength=V).astype(np.float64)
        seen = counts > 0
        if r.prompt:
            seen[r.prompt] = True
        p = r.repetition
        x[seen] = np.where(x[seen] > 0, x[seen] / p, x[seen] * p)
        x -= r.frequency * counts
        x -= r.presence * (counts > 0)
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def ref_min_p(logits: np.ndarray, min_p) -> np.ndarray:
    probs = _softmax(logits)
    thr = np.asarray(min_p, np.float64)[:, None] * probs.max(axis=-1, keepdims=True)
    return np.where(probs < thr, NEG_INF, logits)


def ref_top_k_top_p(logits: np.ndarray, top_k, top_p) -> np.ndarray:
    """top-k (0/negative or >= V disables, ties with the k-th value kept), then vLLM's
    top-p: the smallest head (by descending probability) whose mass reaches p; at least
    one token; p = 1 keeps everything."""
    out = np.asarray(logits, np.float64).copy()
    V = out.shape[1]
    for i, (k, p) in enumerate(zip(top_k, top_p)):
        x = out[i]
        if 0 < k < V:
            kth = np.sort(x)[::-1][k - 1]
            x[x < kth] = NEG_INF
        if p < 1.0:
            order = np.argsort(-x, kind="stable")
            probs = _softmax(x[order])
            before = np.cumsum(probs) - probs
            n_keep = max(1, int(np.sum(before < p)))
            x[order[n_keep:]] = NEG_INF
    return out


def ref_probs(logits: np.ndarray, rows: list[Row]) -> np.ndarray:
    """The distribution a random row samples from."""
    x = ref_processors(logits, rows)
    x = x / np.asarray([r.temperature for r in rows], np.float64)[:, None]
    x = ref_min_p(x, [r.min_p for r in rows])
    x = ref_top_k_top_p(x, [r.top_k for r in rows], [r.top_p for r in rows])
    return _softmax(x)


def _top_p_margin(logits: np.ndarray, top_k, top_p) -> float:
    """How far the nearest cumulative mass sits from its row's p (float32 vs float64
    rounding could flip a token sitting right on the boundary)."""
    x = ref_top_k_top_p(logits, top_k, np.ones(len(top_p)))
    margin = np.inf
    for row, p in zip(x, top_p):
        if p < 1.0:
            probs = np.sort(_softmax(row))[::-1]
            before = np.cumsum(probs) - probs
            margin = min(margin, float(np.min(np.abs(before[1:] - p))))  # the top token always stays
    return margin


def _assert_same_logits(actual, expected, rtol=1e-5, atol=1e-5):
    actual = np.asarray(actual, np.float64)
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=rtol, atol=atol)


# ------------------------------------------------------------ logits processors


def test_logits_processors_match_numpy(rng):
    V = 40
    rows = [
        Row(),  # untouched (has no whitelist although others do)
        Row(allowed=[3, 7, 11, 19, 30]),
        Row(banned=[0, 5, 39], bias={2: 5.0, 9: -3.5, 17: 0.25}),
        Row(repetition=1.7, prompt=[1, 4, 4, 8, 12, 20], output=[4, 25, 25]),
        Row(frequency=0.6, presence=0.9, prompt=[2, 3], output=[6, 6, 6, 10, 33, 10]),
        Row(
            repetition=0.8,
            frequency=-0.3,
            presence=0.4,
            prompt=[0, 1, 2, 3, 4, 5, 6, 7],
            output=[5, 5, 9],
            allowed=[1, 2, 5, 9, 21, 22],
            banned=[22],
            bias={1: 2.0, 21: -1.0},
        ),
        Row(repetition=1.3),  # penalised row with an empty prompt and no outputs yet
    ]
    logits = rng.normal(0.0, 3.0, (len(rows), V)).astype(np.float32)
    md = make_md(rows)
    got = np.asarray(jax.jit(apply_logits_processors)(jnp.asarray(logits), md))
    want = ref_processors(logits, rows)
    _assert_same_logits(got, want)
    # Sanity: the reference really changed something in each non-trivial row.
    assert np.array_equal(got[0], logits[0]) and np.array_equal(got[-1], logits[-1])
    assert all(not np.array_equal(got[i], logits[i]) for i in range(1, 6))


def test_repetition_penalty_sign_rule_and_prompt_only(rng):
    """HF rule: a seen positive logit is divided by p, a seen negative one multiplied.
    At the first decode step (no outputs yet) the prompt alone counts for repetition,
    while frequency/presence (output tokens only) do nothing."""
    V = 16
    logits = rng.normal(0.0, 2.0, (2, V)).astype(np.float32)
    logits[:, 0], logits[:, 1] = 3.0, -3.0
    rows = [
        Row(repetition=2.0, frequency=1.0, presence=1.0, prompt=[0, 1, 0]),
        Row(repetition=2.0, frequency=1.0, presence=1.0, prompt=[2], output=[0, 1, 1]),
    ]
    got = np.asarray(apply_logits_processors(jnp.asarray(logits), make_md(rows)))
    _assert_same_logits(got, ref_processors(logits, rows))
    assert got[0, 0] == pytest.approx(1.5) and got[0, 1] == pytest.approx(-6.0)
    np.testing.assert_array_equal(got[0, 2:], logits[0, 2:])
    assert got[1, 0] == pytest.approx(1.5 - 1.0 - 1.0)  # once: /2, -freq*1, -presence
    assert got[1, 1] == pytest.approx(-6.0 - 2.0 - 1.0)  # twice: *2, -freq*2, -presence


def test_width_zero_arrays_disable_everything(rng):
    logits = rng.normal(size=(3, 32)).astype(np.float32)
    rows = [Row(), Row(temperature=0.0), Row(top_k=3)]
    md = make_md(rows)
    for name in ("prompt_token_ids", "output_token_ids", "bias_token_ids", "banned_token_ids", "allowed_token_ids"):
        assert getattr(md, name).shape == (3, 0)
    np.testing.assert_array_equal(np.asarray(apply_logits_processors(jnp.asarray(logits), md)), logits)


def test_logit_bias_and_bans_are_per_row(rng):
    """Padding (-1) entries and other rows' ids must not leak into a row."""
    V = 24
    logits = rng.normal(size=(4, V)).astype(np.float32)
    rows = [
        Row(bias={0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}),
        Row(banned=[23]),
        Row(bias={23: -100.0}),
        Row(banned=[0, 1, 2, 3, 4, 5, 6]),
    ]
    got = np.asarray(apply_logits_processors(jnp.asarray(logits), make_md(rows)))
    _assert_same_logits(got, ref_processors(logits, rows))
    assert np.isfinite(got[[0, 2]]).all()
    assert np.isneginf(got[1]).sum() == 1 and np.isneginf(got[3]).sum() == 7


# ------------------------------------------------------------------------- min-p


def test_min_p_matches_numpy(rng):
    min_p = np.asarray([0.0, 0.02, 0.1, 0.3, 0.7, 1.0], np.float32)
    logits = rng.normal(0.0, 2.0, (len(min_p), 64)).astype(np.float32)
    logits[3, 5] = NEG_INF  # already-masked tokens stay masked
    got = np.asarray(jax.jit(apply_min_p)(jnp.asarray(logits), jnp.asarray(min_p)))
    _assert_same_logits(got, ref_min_p(logits.astype(np.float64), min_p))
    np.testing.assert_array_equal(got[0], logits[0])  # 0 disables
    assert np.isfinite(got[-1]).sum() == 1  # 1.0 keeps only the most likely token
    # Kept tokens are exactly those with prob >= min_p * max prob.
    probs = _softmax(logits)
    for i in range(1, len(min_p)):
        kept = np.isfinite(got[i])
        assert (probs[i][kept] >= min_p[i] * probs[i].max() * (1 - 1e-5)).all()


# ------------------------------------------------------------------- top-k/top-p


_TOP_K_P = [  # (top_k, top_p)
    (0, 1.0),
    (-1, 1.0),
    (1, 1.0),
    (5, 1.0),
    (48, 1.0),
    (100, 1.0),  # 48 == V, 100 > V
    (0, 0.5),
    (0, 0.9),
    (0, 1e-6),
    (7, 0.8),
    (3, 0.999),
    (48, 0.3),
    (20, 0.95),
]


def test_top_k_top_p_matches_numpy(rng):
    V = 48
    top_k = np.asarray([k for k, _ in _TOP_K_P], np.int32)
    top_p = np.asarray([p for _, p in _TOP_K_P], np.float32)
    while True:
        logits = rng.normal(0.0, 1.5, (len(_TOP_K_P), V)).astype(np.float32)
        if _top_p_margin(logits, top_k, top_p.astype(np.float64)) > 1e-4:
            break
    got = np.asarray(jax.jit(apply_top_k_top_p)(jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p)))
    want = ref_top_k_top_p(logits, top_k, top_p.astype(np.float64))
    _assert_same_logits(got, want, rtol=0, atol=0)  # surviving logits pass through unchanged
    kept = np.isfinite(got).sum(axis=1)
    assert list(kept[:6]) == [V, V, 1, 5, V, V]
    assert kept[8] == 1  # tiny p still keeps the top token
    for i, (k, p) in enumerate(_TOP_K_P):  # the kept head reaches p; one fewer would not
        if p < 1.0:
            restricted = ref_top_k_top_p(logits[i : i + 1], [k], [1.0])[0]
            probs = np.sort(_softmax(restricted))[::-1]
            assert probs[: kept[i]].sum() >= p - 1e-6
            assert probs[: kept[i] - 1].sum() < p


def test_top_k_ties_with_kth_value_survive():
    logits = np.asarray([[5.0, 4.0, 4.0, 4.0, 1.0, 0.0], [3.0, 3.0, 3.0, 2.0, 2.0, 1.0]], np.float32)
    got = np.asarray(apply_top_k_top_p(jnp.asarray(logits), jnp.asarray([2, 1], jnp.int32), jnp.ones(2, jnp.float32)))
    np.testing.assert_array_equal(np.isfinite(got), [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])


def test_top_p_one_keeps_every_token_of_a_peaked_distribution(rng):
    """top_p = 1 disables top-p (vLLM masks cumsum <= 1 - p = 0, i.e. nothing with
    mass). With one dominant logit the float32 softmax of the head rounds to 1, and a
    `mass_before < p` test alone would then cut the whole tail."""
    V = 1000
    logits = rng.normal(size=(3, V)).astype(np.float32)
    logits[:, 0] += 25.0
    top_k = jnp.asarray([0, V, 500], jnp.int32)
    got = np.asarray(apply_top_k_top_p(jnp.asarray(logits), top_k, jnp.ones(3, jnp.float32)))
    assert np.isfinite(got).sum(axis=1).tolist() == [V, V, 500]
    _assert_same_logits(got, ref_top_k_top_p(logits, [0, V, 500], [1.0, 1.0, 1.0]), rtol=0, atol=0)


# ------------------------------------------------------------------------- sample()


_sample_jit = jax.jit(sample, static_argnames="num_logprobs")
# The sample() tests below share one compiled shape where they can (CPU compiles dominate).
S8, V64, W8 = 8, 64, 8


def _draw(logits, rows, num_logprobs=0, width=W8):
    out = _sample_jit(jnp.asarray(logits), make_md(rows, width=width), num_logprobs=num_logprobs)
    return jax.tree.map(np.asarray, out)


def test_greedy_rows_take_argmax_of_processed_logits(rng):
    logits = rng.normal(0.0, 2.0, (S8, V64)).astype(np.float32)
    top = logits.argmax(axis=1)
    rows = [
        Row(temperature=0.0),
        Row(temperature=0.0, banned=[int(top[1])]),
        Row(temperature=0.0, bias={7: 50.0}),
        Row(temperature=0.0, allowed=[3, 9, 27]),
        Row(temperature=0.0, repetition=100.0, prompt=[int(top[4])], output=[int(top[4])]),
        Row(temperature=0.0, frequency=5.0, output=[int(top[5])] * 3),
        Row(temperature=0.0, top_k=1, top_p=0.1, min_p=0.9),  # filters do not touch greedy rows
        Row(temperature=0.0, bias={int(top[7]): -3.0}, presence=1.0, output=[0, 1]),
    ]
    want = ref_processors(logits, rows).argmax(axis=1)
    assert want[2] == 7 and want[3] in (3, 9, 27) and want[1] != top[1] and want[4] != top[4]
    got = _draw(logits, rows).sampled_token_ids  # all greedy: the lax.cond fast path
    np.testing.assert_array_equal(got, want)
    # Mixed batch: random rows beside them do not change the greedy rows.
    mixed = rows[:6] + [Row(temperature=1.0, seed=1), Row(temperature=0.5, top_k=3, seed=2)]
    np.testing.assert_array_equal(_draw(logits, mixed).sampled_token_ids[:6], want[:6])


def _random_rows(num: int, rng) -> list[Row]:
    configs = [
        dict(),
        dict(temperature=0.6, top_k=10),
        dict(top_p=0.7),
        dict(min_p=0.05, temperature=1.4),
        dict(top_k=20, top_p=0.9, bias={3: 2.0}),
        dict(banned=[0, 1, 2], presence=0.5, output=[4, 5]),
    ]
    return [
        Row(seed=int(rng.integers(0, 2**63)), step=int(rng.integers(0, 1000)), **configs[i % len(configs)])
        for i in range(num)
    ]


def test_seeded_row_is_batch_invariant(rng):
    """Same seed/step/params/logits -> same token, whatever else is in the batch and
    wherever the row sits (each row alone in a batch of one is the reference)."""
    rows = _random_rows(6, rng)
    logits = rng.normal(0.0, 1.0, (6, V64)).astype(np.float32)
    alone = np.asarray([_draw(logits[i : i + 1], [rows[i]]).sampled_token_ids[0] for i in range(6)])

    for trial in range(3):  # the six rows shuffled among two other rows (random or greedy)
        extra = _random_rows(2, rng)
        extra[0].temperature = 0.0 if trial else 1.0
        order = list(rng.permutation(8))  # positions 6 and 7 are the extra rows
        batch_rows = [rows[o] if o < 6 else extra[o - 6] for o in order]
        batch_logits = np.stack([logits[o] if o < 6 else rng.normal(size=V64).astype(np.float32) for o in order])
        got = _draw(batch_logits, batch_rows).sampled_token_ids
        for j, o in enumerate(order):
            if o < 6:
                assert got[j] == alone[o], (trial, o)
    assert len(set(alone.tolist())) > 1


def test_steps_and_seeds_give_different_draws():
    logits = np.zeros((S8, V64), np.float32)  # uniform: two keys agree 1/64 of the time
    seed = 2**40 + 12345  # uses both halves of the 64-bit seed

    def draws(seed):  # 64 steps, eight at a time
        return np.concatenate(
            [
                _draw(logits, [Row(seed=seed, step=s) for s in range(b, b + S8)]).sampled_token_ids
                for b in range(0, 64, S8)
            ]
        )

    by_step = draws(seed)
    assert len(set(by_step.tolist())) > 30  # ~41 distinct values expected
    np.testing.assert_array_equal(draws(seed), by_step)  # reproducible
    assert np.sum(draws(seed + 1) != by_step) > 52  # ~63 expected
    assert np.sum(draws(seed + 2**32) != by_step) > 52  # the high half counts too


def _draw_many(logits, rows, num_steps):
    """[num_steps, S] tokens: one jitted call looping over the step (lax.map compiles
    several times faster than vmap here and runs about as fast)."""
    md = make_md(rows)

    @jax.jit
    def run(logits, md):
        def one(step):
            md_s = dataclasses.replace(md, step=md.step + step)
            return sample(logits, md_s, num_logprobs=0).sampled_token_ids

        return jax.lax.map(one, jnp.arange(num_steps, dtype=jnp.int32))

    return np.asarray(run(jnp.asarray(logits), md))


def test_sampling_distribution_matches_numpy(rng):
    """20k draws per row (varying `step`) vs the reference probabilities after
    penalties/bias, temperature, min-p, top-k and top-p."""
    V, N = 10, 20_000
    rows = [
        Row(temperature=1.0, seed=11),
        Row(temperature=0.7, seed=12),
        Row(temperature=1.5, top_k=4, seed=13),
        Row(temperature=1.0, top_p=0.75, seed=14),
        Row(temperature=0.9, top_k=6, top_p=0.85, min_p=0.05, seed=15),
        Row(temperature=1.2, min_p=0.2, seed=16),
        Row(temperature=1.0, bias={9: 1.5}, banned=[0], allowed=[0, 1, 2, 5, 9], seed=17),
        Row(temperature=0.8, repetition=1.5, frequency=0.3, presence=0.2, prompt=[1, 2], output=[3, 3], seed=18),
        Row(temperature=0.5, min_p=0.3, seed=19),  # min_p sees the temperature-scaled distribution
    ]
    while True:
        logits = rng.normal(0.0, 1.0, (len(rows), V)).astype(np.float32)
        # Token 1 sits 0.9 below the top: kept by min_p=0.3 at T=1 (e^-0.9 = 0.41), cut at
        # T=0.5 (e^-1.8 = 0.17), so min_p applied before temperature would show.
        logits[-1, 0] = logits[-1].max() + 1.0
        logits[-1, 1] = logits[-1, 0] - 0.9
        x = ref_processors(logits, rows) / np.asarray([r.temperature for r in rows])[:, None]
        x = ref_min_p(x, [r.min_p for r in rows])
        if _top_p_margin(x, [r.top_k for r in rows], [r.top_p for r in rows]) > 1e-3:
            break
    want = ref_probs(logits, rows)
    draws = _draw_many(logits, rows, N)
    assert draws.shape == (N, len(rows))
    for i in range(len(rows)):
        freq = np.bincount(draws[:, i], minlength=V) / N
        p = want[i]
        # (d) nothing outside the support is ever drawn
        assert (freq[p == 0] == 0).all(), (i, freq, p)
        # (c) per-token 5-sigma binomial bound, plus total variation
        sigma = np.sqrt(p * (1 - p) / N)
        assert (np.abs(freq - p) <= 5 * sigma + 1e-9).all(), (i, freq, p)
        assert 0.5 * np.abs(freq - p).sum() < 0.02, (i, freq, p)
        # chi-square over the support: df = support - 1; mean df, sd sqrt(2 df)
        support = p > 0
        df = support.sum() - 1
        if df > 0:
            chi2 = N * np.sum((freq[support] - p[support]) ** 2 / p[support])
            assert chi2 < df + 6 * np.sqrt(2 * df) + 10, (i, chi2, df)
    assert (want > 0).sum(axis=1).tolist()[2] == 4  # the filters really bite
    assert (want[3] > 0).sum() < V and (want[5] > 0).sum() < V
    assert want[-1, 1] == 0


def test_filtered_tokens_are_never_drawn(rng):
    """(d) on a bigger vocabulary: draws stay inside top-k / top-p / min-p / allowed and
    never hit banned ids."""
    V, N = 256, 2000
    rows = [
        Row(top_k=5, seed=1),
        Row(top_p=0.3, seed=2),
        Row(min_p=0.3, seed=3),
        Row(allowed=[10, 20, 30, 40], banned=[20], seed=4),
        Row(banned=list(range(0, 256, 2)), temperature=3.0, seed=5),
        Row(top_k=50, top_p=0.5, min_p=0.1, temperature=2.0, seed=6),
    ]
    logits = rng.normal(0.0, 2.0, (len(rows), V)).astype(np.float32)
    want = ref_probs(logits, rows)
    draws = _draw_many(logits, rows, N)
    for i in range(len(rows)):
        support = set(np.flatnonzero(want[i] > 0).tolist())
        drawn = set(draws[:, i].tolist())
        assert drawn <= support, (i, drawn - support)
    assert set(draws[:, 3].tolist()) <= {10, 30, 40}
    assert (draws[:, 4] % 2 == 1).all()
    assert len(set(draws[:, 4].tolist())) > 50  # the hot row really spreads out


# ----------------------------------------------------------------------- logprobs


def test_compute_logprobs_matches_numpy(rng):
    S, V, K = 5, 120, 6
    logits = rng.normal(0.0, 3.0, (S, V)).astype(np.float32)
    tokens = rng.integers(0, V, S).astype(np.int32)
    tokens[0] = logits[0].argmax()
    tokens[1] = logits[1].argmin()
    top_ids, top_lp, tok_lp, ranks = jax.jit(compute_logprobs, static_argnums=2)(
        jnp.asarray(logits), jnp.asarray(tokens), K
    )
    ref = _log_softmax(logits)
    order = np.argsort(-ref, axis=1, kind="stable")[:, :K]
    np.testing.assert_array_equal(np.asarray(top_ids), order)
    np.testing.assert_allclose(np.asarray(top_lp), np.take_along_axis(ref, order, axis=1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(tok_lp), ref[np.arange(S), tokens], atol=1e-5)
    want_ranks = (ref > ref[np.arange(S), tokens][:, None]).sum(axis=1) + 1
    np.testing.assert_array_equal(np.asarray(ranks), want_ranks)
    assert int(ranks[0]) == 1 and int(ranks[1]) == V
    assert np.asarray(top_ids).dtype == np.int32 and np.asarray(ranks).dtype == np.int32


def test_sample_returns_raw_logprobs_of_the_sampled_token(rng):
    """Logprobs come from the raw logits (vLLM's default raw_logprobs), not from the
    biased/penalised/filtered ones; num_logprobs = 0 gives width-0 outputs."""
    K = 3
    logits = rng.normal(0.0, 2.0, (S8, V64)).astype(np.float32)
    rows = [
        Row(temperature=0.0, bias={5: 30.0}),
        Row(seed=3, top_k=8),
        Row(temperature=0.0),
        Row(seed=4, allowed=[1, 2, 3]),
        Row(seed=5, repetition=3.0, prompt=[0, 1, 2, 3]),
        Row(seed=6, temperature=2.0),
        Row(seed=7, top_p=0.5),
        Row(temperature=0.0, banned=[9]),
    ]
    out = _draw(logits, rows, num_logprobs=K)
    ref = _log_softmax(logits)
    tok = out.sampled_token_ids
    assert tok[0] == 5 and tok[2] == logits[2].argmax() and tok[3] in (1, 2, 3)
    rows_idx = np.arange(S8)
    np.testing.assert_allclose(out.sampled_logprobs, ref[rows_idx, tok], atol=1e-5)
    np.testing.assert_array_equal(out.sampled_ranks, (ref > ref[rows_idx, tok][:, None]).sum(1) + 1)
    order = np.argsort(-ref, axis=1, kind="stable")[:, :K]
    np.testing.assert_array_equal(out.topk_token_ids, order)
    np.testing.assert_allclose(out.topk_logprobs, np.take_along_axis(ref, order, axis=1), atol=1e-5)

    none = _draw(logits, rows, num_logprobs=0)
    np.testing.assert_array_equal(none.sampled_token_ids, tok)
    assert none.topk_token_ids.shape == (S8, 0) and none.topk_logprobs.shape == (S8, 0)
