"""Prefix-cache block hashes (vLLM's prefix_caching_hash_algo): a cryptographic digest
of a page's tokens chained to its parent's, so that no prompt can be crafted to collide
with another user's cached page and read its K/V. Python's hash() of a tuple, which jllm
used before, is cheap to collide.

`sha256` digests a canonical byte encoding written here; `sha256_cbor` digests RFC 8949
canonical CBOR of (parent, tokens, extra keys), which other languages can reproduce (vLLM
offers it for KV-cache connectors).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence

BlockHash = bytes
# (parent block's hash or None, the block's token ids, extra keys or None) -> its hash.
BlockHashFunction = Callable[[BlockHash | None, Sequence[int], str | None], BlockHash]

PREFIX_CACHING_HASH_ALGOS = ("sha256", "sha256_cbor")


def _length_prefixed(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def sha256_block_hash(parent: BlockHash | None, token_ids: Sequence[int], extra_keys: str | None) -> BlockHash:
    """Each part length-prefixed, so no two (parent, tokens, keys) triples share bytes;
    None is told apart from the empty string by a flag byte."""
    parts = [
        b"\x00" if parent is None else b"\x01" + _length_prefixed(parent),
        _length_prefixed(struct.pack(f"<{len(token_ids)}q", *token_ids)),
        b"\x00" if extra_keys is None else b"\x01" + _length_prefixed(extra_keys.encode("utf-8")),
    ]
    return hashlib.sha256(b"".join(parts)).digest()


def sha256_cbor_block_hash(parent: BlockHash | None, token_ids: Sequence[int], extra_keys: str | None) -> BlockHash:
    import cbor2

    return hashlib.sha256(cbor2.dumps((parent, list(token_ids), extra_keys), canonical=True)).digest()


def get_block_hash_function(algo: str) -> BlockHashFunction:
    if algo == "sha256":
        return sha256_block_hash
    if algo == "sha256_cbor":
        return sha256_cbor_block_hash
    raise ValueError(f"Unknown prefix_caching_hash_algo: {algo!r}. Supported: {list(PREFIX_CACHING_HASH_ALGOS)}")
