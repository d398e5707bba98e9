"""Host-side bookkeeping of the paged KV cache: which pages each request holds.

vLLM's KVCacheManager and BlockPool in one class (nano-vllm's BlockManager). Pages are
ref-counted so that requests with a common prefix share them (automatic prefix
caching): a full page is registered under a hash of its tokens chained to the hashes
of all pages before it, and a freed page keeps its contents, findable by that hash,
until it is needed for something else.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from jllm.core.block_hash import BlockHash, get_block_hash_function
from jllm.engine.request import Request

logger = logging.getLogger(__name__)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class KVCacheBlock:
    block_id: int
    # Live requests holding the page.
    ref_cnt: int = 0
    # Set while the page is full and registered in the prefix cache, with what was
    # hashed: a hit must match it, so even a hash collision cannot hand out the page.
    block_hash: BlockHash | None = None
    block_key: tuple | None = None


@dataclass
class PrefixCacheStats:
    """Prefix-cache lookups in tokens (vLLM's PrefixCacheStats).

    Requests resuming after preemption are counted apart: they mostly hit their own
    pages, which would flatter the hit rate.
    """

    requests: int = 0
    queries: int = 0
    hits: int = 0
    preempted_requests: int = 0
    preempted_queries: int = 0
    preempted_hits: int = 0

    def record(self, num_tokens: int, num_hits: int, preempted: bool) -> None:
        if preempted:
            self.preempted_requests += 1
            self.preempted_queries += num_tokens
            self.preempted_hits += num_hits
        else:
            self.requests += 1
            self.queries += num_tokens
            self.hits += num_hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockManager:
    def __init__(
        self,
        block_size: int,
        num_blocks: int,
        enable_prefix_caching: bool = True,
        prefix_caching_hash_algo: str = "sha256",
    ):
        self.block_size = block_size
        self.hash_function = get_block_hash_function(prefix_caching_hash_algo)
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # Pages with ref_cnt 0, next to be handed out first. A cached page is appended
        # when freed, so cached pages are evicted least recently freed first.
        self.free_block_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_block_hash_to_block: dict[BlockHash, KVCacheBlock] = {}
        # Per request: how many of its leading pages are already in the prefix cache.
        self.num_cached_block: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        """Pages not held by any request, cached-but-unreferenced ones included."""
        return len(self.free_block_queue)

    @property
    def usage(self) -> float:
        """Fraction of pages held by requests (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest prefix of `request` already in the cache: (page ids, tokens)."""
        if self._skip_reading_prefix_cache(request):
            return [], 0
        self._update_block_hashes(request)
        # At least the last token is recomputed: the model must produce its logits.
        max_num_blocks = (request.num_tokens - 1) // self.block_size
        computed_block_ids = []
        token_ids = request.all_token_ids
        for i, block_hash in enumerate(request.block_hashes[:max_num_blocks]):
            block = self.cached_block_hash_to_block.get(block_hash)
            if block is None or block.block_key != self._block_key(request, i, token_ids):
                break
            computed_block_ids.append(block.block_id)
        return computed_block_ids, len(computed_block_ids) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[int] = ()) -> bool:
        """Give `request` pages for its computed tokens, any new prefix-cache hits and
        `num_new_tokens` more; False, changing nothing, when too few pages are free."""
        if (
            not new_computed_blocks
            and request.block_ids
            and request.num_computed_tokens + num_new_tokens <= len(request.block_ids) * self.block_size
        ):
            return True  # A decode within its last page, the common case: nothing to do.
        num_tokens = request.num_computed_tokens + len(new_computed_blocks) * self.block_size + num_new_tokens
        num_new_blocks = max(0, cdiv(num_tokens, self.block_size) - len(request.block_ids) - len(new_computed_blocks))
        hits = [self.blocks[block_id] for block_id in new_computed_blocks]
        # A hit that no request holds sits in the free queue; taking it shrinks the queue.
        num_evictable_hits = sum(1 for block in hits if block.ref_cnt == 0)
        if num_new_blocks + num_evictable_hits > self.num_free_blocks:
            return False

        if not request.block_ids:
            # The start of a (re)computation: the one prefix-cache lookup to count.
            if not self._skip_reading_prefix_cache(request):
                self.prefix_cache_stats.record(
                    request.num_tokens, len(hits) * self.block_size, request.num_preemptions > 0
                )
            self.num_cached_block[request.request_id] = len(hits)
        for block in hits:
            self._touch(block)
            request.block_ids.append(block.block_id)
        for _ in range(num_new_blocks):
            request.block_ids.append(self._get_new_block().block_id)
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's pages that have become full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        num_full_blocks = request.num_computed_tokens // self.block_size
        num_cached_blocks = self.num_cached_block.get(request.request_id, 0)
        if num_full_blocks <= num_cached_blocks:
            return
        self._update_block_hashes(request)
        token_ids = request.all_token_ids
        for i in range(num_cached_blocks, num_full_blocks):
            block_hash = request.block_hashes[i]
            # Two requests may compute the same page at once (or, were the hash broken,
            # different pages under one hash): the first stays the cached copy and the
            # other is an ordinary page, recycled when freed.
            if block_hash not in self.cached_block_hash_to_block:
                block = self.blocks[request.block_ids[i]]
                block.block_hash = block_hash
                block.block_key = self._block_key(request, i, token_ids)
                self.cached_block_hash_to_block[block_hash] = block
        self.num_cached_block[request.request_id] = num_full_blocks

    def free(self, request: Request) -> None:
        """Release the request's pages; cached ones stay findable until evicted."""
        # In reverse, so a request's tail pages (the least likely to be shared) are
        # the first of its pages to be evicted.
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue[block_id] = None
                if block.block_hash is None:
                    # An uncached page holds nothing reusable: hand it out before
                    # evicting any cached one.
                    self.free_block_queue.move_to_end(block_id, last=False)
        request.block_ids = []
        self.num_cached_block.pop(request.request_id, None)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached page; only possible while no request holds pages."""
        num_used_blocks = self.num_blocks - self.num_free_blocks
        if num_used_blocks > 0:
            logger.warning("Failed to reset prefix cache because some blocks (%d) are not freed yet", num_used_blocks)
            return False
        self.cached_block_hash_to_block.clear()
        for block in self.blocks:
            block.block_hash = None
            block.block_key = None
        logger.info("Successfully reset prefix cache")
        return True

    def check_no_leaks(self) -> None:
        """Raise unless every page is free (at most kept by the prefix cache)."""
        held = [b.block_id for b in self.blocks if b.ref_cnt != 0]
        if held or self.num_free_blocks != self.num_blocks:
            raise AssertionError(f"KV pages still held by requests: {held}")

    def _skip_reading_prefix_cache(self, request: Request) -> bool:
        # Prompt logprobs need logits at every prompt position, so none may be skipped.
        return not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None

    def _update_block_hashes(self, request: Request) -> None:
        """Extend request.block_hashes to cover all its full pages of tokens."""
        block_hashes = request.block_hashes
        num_full_blocks = request.num_tokens // self.block_size
        if len(block_hashes) >= num_full_blocks:
            return
        token_ids = request.all_token_ids
        parent_hash = block_hashes[-1] if block_hashes else None
        for i in range(len(block_hashes), num_full_blocks):
            # Chaining the parent's hash makes a page's identity its whole prefix, so
            # equal tokens after a different prefix (and so different K/V) never match.
            # The salt enters the first hash only; chaining carries it to the rest.
            extra_keys = request.cache_salt if i == 0 else None
            parent_hash = self.hash_function(
                parent_hash, token_ids[i * self.block_size : (i + 1) * self.block_size], extra_keys
            )
            block_hashes.append(parent_hash)

    def _block_key(self, request: Request, i: int, token_ids: list[int]) -> tuple:
        """What the request's i-th page hash covers: its parent's hash, its tokens (of
        `token_ids`, the request's all_token_ids) and the salt."""
        start = i * self.block_size
        return (
            request.block_hashes[i - 1] if i else None,
            tuple(token_ids[start : start + self.block_size]),
            request.cache_salt if i == 0 else None,
        )

    def _touch(self, block: KVCacheBlock) -> None:
        if block.ref_cnt == 0:
            del self.free_block_queue[block.block_id]
        block.ref_cnt += 1

    def _get_new_block(self) -> KVCacheBlock:
        block_id, _ = self.free_block_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            # Evicted: its contents are about to be overwritten.
            del self.cached_block_hash_to_block[block.block_hash]
            block.block_hash = None
            block.block_key = None
        block.ref_cnt = 1
        return block
