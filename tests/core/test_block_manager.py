"""BlockManager: page ref counts, the free queue and automatic prefix caching."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from jllm.core.block_hash import PREFIX_CACHING_HASH_ALGOS, get_block_hash_function, sha256_block_hash
from jllm.core.block_manager import BlockManager
from jllm.engine.request import Request

BLOCK_SIZE = 4


def make_request(request_id, prompt, *, cache_salt=None, prompt_logprobs=None):
    params = SimpleNamespace(prompt_logprobs=prompt_logprobs, max_tokens=16)
    return Request(request_id, list(prompt), params, cache_salt=cache_salt)


def prefill(bm, request):
    """Compute the whole prompt as the scheduler would: cache hits, then the rest.
    Returns the number of tokens that came from the prefix cache."""
    computed_blocks, num_cached = bm.get_computed_blocks(request)
    assert bm.allocate_slots(request, request.num_tokens - num_cached, computed_blocks)
    request.num_computed_tokens = request.num_tokens
    bm.cache_full_blocks(request)
    return num_cached


def test_allocate_slots_gives_one_page_per_block_size_tokens():
    bm = BlockManager(BLOCK_SIZE, num_blocks=8)
    request = make_request("a", range(9))
    assert bm.allocate_slots(request, 9)
    assert len(request.block_ids) == 3
    assert bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)


def test_allocate_slots_adds_pages_only_when_tokens_cross_a_page():
    bm = BlockManager(BLOCK_SIZE, num_blocks=8)
    request = make_request("a", range(5))
    assert bm.allocate_slots(request, 5)
    request.num_computed_tokens = 5
    first_pages = list(request.block_ids)
    assert bm.allocate_slots(request, 3)
    assert request.block_ids == first_pages
    request.num_computed_tokens = 8
    assert bm.allocate_slots(request, 1)
    assert request.block_ids[:2] == first_pages and len(request.block_ids) == 3


def test_allocate_slots_fails_without_side_effects_when_pages_run_out():
    bm = BlockManager(BLOCK_SIZE, num_blocks=2)
    request = make_request("a", range(9))
    assert not bm.allocate_slots(request, 9)
    assert request.block_ids == []
    assert bm.num_free_blocks == 2
    assert bm.prefix_cache_stats.queries == 0


def test_free_returns_every_page():
    bm = BlockManager(BLOCK_SIZE, num_blocks=8)
    requests = [make_request(str(i), range(10 * i, 10 * i + 7)) for i in range(3)]
    for request in requests:
        prefill(bm, request)
    assert bm.num_free_blocks == 2
    for request in requests:
        bm.free(request)
        assert request.block_ids == []
    assert bm.num_free_blocks == 8
    bm.check_no_leaks()


def test_check_no_leaks_raises_while_a_page_is_held():
    bm = BlockManager(BLOCK_SIZE, num_blocks=4)
    prefill(bm, make_request("a", range(3)))
    with pytest.raises(AssertionError):
        bm.check_no_leaks()


def test_shared_prefix_pages_are_ref_counted_across_requests():
    bm = BlockManager(BLOCK_SIZE, num_blocks=8)
    a = make_request("a", range(10))
    b = make_request("b", list(range(10)) + [99, 98])
    prefill(bm, a)
    assert prefill(bm, b) == 8
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]
    assert [bm.blocks[i].ref_cnt for i in a.block_ids] == [2, 2, 1]
    bm.free(a)
    assert [bm.blocks[i].ref_cnt for i in b.block_ids] == [1, 1, 1]
    bm.free(b)
    bm.check_no_leaks()


def test_whole_prompt_is_never_a_hit_so_the_last_token_gets_logits():
    bm = BlockManager(BLOCK_SIZE, num_blocks=8)
    prefill(bm, make_request("a", range(8)))
    twin = make_request("b", range(8))
    # vLLM's max cache hit length is num_tokens - 1: 7 tokens, one full page.
    assert bm.get_computed_blocks(twin)[1] == 4


def test_same_tokens_after_a_different_prefix_are_not_a_hit():
    bm = BlockManager(BLOCK_SIZE, num_blocks=8)
    prefill(bm, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 0]))
    other = make_request("b", [9, 9, 9, 9, 5, 6, 7, 8, 0])
    assert bm.get_computed_blocks(other) == ([], 0)


def test_cache_salt_isolates_prefix_cache_entries():
    bm = BlockManager(BLOCK_SIZE, num_blocks=8)
    prompt = list(range(9))
    prefill(bm, make_request("a", prompt, cache_salt="alice"))
    assert bm.get_computed_blocks(make_request("b", prompt, cache_salt="bob"))[1] == 0
    assert bm.get_computed_blocks(make_request("c", prompt))[1] == 0
    assert bm.get_computed_blocks(make_request("d", prompt, cache_salt="alice"))[1] == 8


def test_prompt_logprobs_skip_reading_but_still_fill_the_cache():
    bm = BlockManager(BLOCK_SIZE, num_blocks=8)
    prompt = list(range(9))
    prefill(bm, make_request("a", prompt))
    assert prefill(bm, make_request("b", prompt, prompt_logprobs=1)) == 0
    assert bm.get_computed_blocks(make_request("c", prompt))[1] == 8


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(BLOCK_SIZE, num_blocks=8, enable_prefix_caching=False)
    prompt = list(range(9))
    prefill(bm, make_request("a", prompt))
    assert prefill(bm, make_request("b", prompt)) == 0
    assert bm.cached_block_hash_to_block == {}


def test_freed_cached_pages_are_evicted_least_recently_freed_first():
    bm = BlockManager(BLOCK_SIZE, num_blocks=3)
    a = make_request("a", [1, 1, 1, 1, 0])
    b = make_request("b", [2, 2, 2, 2, 0])
    prefill(bm, a)
    bm.free(a)
    prefill(bm, b)
    bm.free(b)
    # Free in line: b's uncached tail page, a's cached page, b's cached page.
    # c's two fresh pages take the first two.
    prefill(bm, make_request("c", [3] * 5))
    assert bm.get_computed_blocks(make_request("a2", [1, 1, 1, 1, 0]))[1] == 0
    assert bm.get_computed_blocks(make_request("b2", [2, 2, 2, 2, 0]))[1] == 4


def test_free_puts_a_requests_tail_pages_first_in_line_for_eviction():
    bm = BlockManager(BLOCK_SIZE, num_blocks=3)
    a = make_request("a", range(12))
    prefill(bm, a)
    bm.free(a)
    # One fresh page evicts a's last page; its first two stay a hit.
    prefill(bm, make_request("x", [99]))
    assert bm.get_computed_blocks(make_request("a2", range(12)))[1] == 8


def test_uncached_pages_are_reused_before_cached_ones():
    bm = BlockManager(BLOCK_SIZE, num_blocks=2)
    a = make_request("a", range(4))
    b = make_request("b", [7, 7])
    prefill(bm, a)
    prefill(bm, b)
    bm.free(a)
    bm.free(b)
    # b's half-full page was freed last but holds nothing reusable.
    prefill(bm, make_request("x", [99]))
    assert bm.get_computed_blocks(make_request("a2", [0, 1, 2, 3, 9]))[1] == 4


def test_evicted_page_drops_its_hash_entry():
    bm = BlockManager(BLOCK_SIZE, num_blocks=1)
    a = make_request("a", range(4))
    prefill(bm, a)
    assert len(bm.cached_block_hash_to_block) == 1
    bm.free(a)
    prefill(bm, make_request("b", [7]))
    assert bm.cached_block_hash_to_block == {}
    assert all(block.block_hash is None for block in bm.blocks)


def test_hit_on_a_free_cached_page_counts_against_free_pages():
    bm = BlockManager(BLOCK_SIZE, num_blocks=3)
    a = make_request("a", range(8))
    prefill(bm, a)
    bm.free(a)
    b = make_request("b", list(range(8)) + [50] * 8)
    computed_blocks, num_cached = bm.get_computed_blocks(b)
    assert num_cached == 8
    # Two hit pages leave one free page; the remaining 8 tokens need two.
    assert not bm.allocate_slots(b, 8, computed_blocks)
    assert bm.num_free_blocks == 3 and b.block_ids == []
    assert bm.allocate_slots(b, 4, computed_blocks)
    assert bm.num_free_blocks == 0


def test_generated_tokens_fill_pages_that_become_hits():
    bm = BlockManager(BLOCK_SIZE, num_blocks=8)
    a = make_request("a", range(6))
    prefill(bm, a)
    a.append_output_token_id(100)
    for token in [101, 102]:  # Decode steps: compute the last token, sample the next.
        assert bm.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        bm.cache_full_blocks(a)
        a.append_output_token_id(token)
    # Computed: 0..5, 100, 101 (two full pages); 102 is sampled but not yet computed.
    follow_up = make_request("b", list(range(6)) + [100, 101, 102, 7])
    assert bm.get_computed_blocks(follow_up) == (a.block_ids[:2], 8)


def test_same_page_computed_twice_keeps_the_first_as_the_cached_copy():
    bm = BlockManager(BLOCK_SIZE, num_blocks=4)
    a, b = make_request("a", range(5)), make_request("b", range(5))
    for request in (a, b):
        assert bm.allocate_slots(request, 5)
        request.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    bm.cache_full_blocks(b)
    assert bm.cached_block_hash_to_block[a.block_hashes[0]].block_id == a.block_ids[0]
    assert bm.blocks[b.block_ids[0]].block_hash is None
    bm.free(a)
    bm.free(b)
    bm.check_no_leaks()


def test_reset_prefix_cache_refuses_while_pages_are_held():
    bm = BlockManager(BLOCK_SIZE, num_blocks=4)
    a = make_request("a", range(5))
    prefill(bm, a)
    assert not bm.reset_prefix_cache()
    bm.free(a)
    assert bm.reset_prefix_cache()
    assert bm.get_computed_blocks(make_request("b", range(5))) == ([], 0)


def test_prefix_cache_stats_count_tokens_queried_and_hit():
    bm = BlockManager(BLOCK_SIZE, num_blocks=8)
    prefill(bm, make_request("a", range(10)))
    prefill(bm, make_request("b", range(10)))
    stats = bm.prefix_cache_stats
    assert (stats.requests, stats.queries, stats.hits) == (2, 20, 8)
    assert stats.hit_rate == pytest.approx(0.4)
    resumed = make_request("c", range(10))
    resumed.num_preemptions = 1
    prefill(bm, resumed)
    assert (stats.queries, stats.preempted_queries, stats.preempted_hits) == (20, 10, 8)


# ----- hashing that no prompt can poison -----------------------------------------------------


@pytest.mark.parametrize("algo", PREFIX_CACHING_HASH_ALGOS)
def test_a_prompt_starting_with_anothers_second_page_gets_no_hit(algo):
    """A page's hash is its whole prefix: the same tokens after another prefix are not it."""
    bm = BlockManager(BLOCK_SIZE, num_blocks=8, prefix_caching_hash_algo=algo)
    prefill(bm, make_request("victim", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert prefill(bm, make_request("attacker", [5, 6, 7, 8, 9, 10])) == 0
    assert prefill(bm, make_request("same_prefix", [1, 2, 3, 4, 5, 6, 7, 8, 0])) == 8


def test_a_forced_hash_collision_cannot_hand_out_another_prompts_page():
    """With a hash function that collides everywhere (a test double), the stored key of
    each cached page still tells prompts apart: no wrong page is reused."""
    bm = BlockManager(BLOCK_SIZE, num_blocks=8)
    bm.hash_function = lambda parent, tokens, extra_keys: b"collision"
    victim = make_request("victim", [1, 2, 3, 4, 5])
    prefill(bm, victim)
    assert list(bm.cached_block_hash_to_block) == [b"collision"]
    attacker = make_request("attacker", [9, 9, 9, 9, 5])
    assert bm.get_computed_blocks(attacker) == ([], 0)
    assert prefill(bm, attacker) == 0 and attacker.block_ids[0] != victim.block_ids[0]
    # The attacker's page does not replace the victim's under the shared hash either.
    assert bm.cached_block_hash_to_block[b"collision"].block_id == victim.block_ids[0]
    assert prefill(bm, make_request("victim_again", [1, 2, 3, 4, 6])) == BLOCK_SIZE


def test_salted_pages_are_apart_from_unsalted_and_other_salts():
    bm = BlockManager(BLOCK_SIZE, num_blocks=16)
    prefill(bm, make_request("a", range(9), cache_salt="alice"))
    assert prefill(bm, make_request("b", range(9))) == 0
    assert prefill(bm, make_request("c", range(9), cache_salt="bob")) == 0
    assert prefill(bm, make_request("d", range(9), cache_salt="")) == 0
    assert prefill(bm, make_request("e", range(9), cache_salt="alice")) == 8


def test_sha256_key_encoding_has_no_ambiguity():
    """Length prefixes and None flags: no two different keys share their encoded bytes."""
    keys = [
        (None, [1, 2], None),
        (None, [1, 2], ""),
        (b"", [1, 2], None),
        (None, [1], "\x02"),
        (None, [258], None),
        (None, [1, 2], "a"),
        (sha256_block_hash(None, [1], None), [2], None),
    ]
    for algo in PREFIX_CACHING_HASH_ALGOS:
        digests = {get_block_hash_function(algo)(*key) for key in keys}
        assert len(digests) == len(keys) and all(len(d) == 32 for d in digests)


@pytest.mark.slow
def test_block_hashes_do_not_depend_on_the_process():
    """Unlike Python's hash(), the digest is the same in every process (PYTHONHASHSEED)."""
    code = (
        "from jllm.core.block_hash import sha256_block_hash as h; "
        "print(h(h(None, [1, 2, 3, 4], 'salt'), [5, 6, 7, 8], None).hex())"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(runs) == 1
    assert (
        runs.pop().strip() == sha256_block_hash(sha256_block_hash(None, [1, 2, 3, 4], "salt"), [5, 6, 7, 8], None).hex()
    )


def test_an_unknown_hash_algo_is_refused():
    with pytest.raises(ValueError, match="Unknown prefix_caching_hash_algo: 'md5'"):
        BlockManager(BLOCK_SIZE, num_blocks=4, prefix_caching_hash_algo="md5")
