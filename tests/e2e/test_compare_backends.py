"""scripts/compare_backends.py's verdict: which differences between the kernel and the
reference path fail (the GPU run itself is in BUILD_NOTES.md)."""

import types

from scripts.compare_backends import divergences, max_common_diff, verdict


def _out(ids, tops):
    """A (token ids, per-token {token: Logprob-like}) pair as `run` returns."""
    return ids, [{t: types.SimpleNamespace(logprob=lp) for t, lp in top.items()} for top in tops]


def test_a_flipped_near_tie_passes_and_a_clear_disagreement_fails():
    ref = [_out([1, 2], [{1: -0.5, 9: -2.0}, {2: -1.00000, 3: -1.00005}])]
    tie = [_out([1, 3], [{1: -0.5001, 9: -2.0}, {3: -0.99990, 2: -1.00010}])]
    found = divergences(ref, tie)
    assert [(p, i, in_top) for p, i, _, in_top in found] == [(0, 1, True)]
    assert abs(found[0][2] - 5e-5) < 1e-9
    assert verdict("float32", max_common_diff(ref, tie), found) == []

    ref_clear = [_out([1, 2], [{1: -0.5, 9: -2.0}, {2: -0.1, 3: -3.0}])]
    failures = verdict("float32", 0.0, divergences(ref_clear, tie))
    assert len(failures) == 1 and "top-2 gap 2.9e+00" in failures[0]


def test_a_token_outside_the_references_top_k_fails_and_so_do_wide_logprob_gaps():
    ref = [_out([1, 2], [{1: -0.5, 9: -2.0}, {2: -1.0, 3: -1.0001}])]
    other = [_out([1, 7], [{1: -0.5, 9: -2.0}, {7: -0.9, 2: -1.2}])]
    failures = verdict("bfloat16", 0.0, divergences(ref, other))
    assert len(failures) == 1 and "not in its top-k" in failures[0]
    assert verdict("bfloat16", 3e-2, []) == ["max |dlogprob| 3.00e-02 > 2e-02"]
    assert verdict("bfloat16", 3e-3, []) == []
