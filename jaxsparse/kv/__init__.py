"""KV caches for decoding, and the selection and eviction policies that read or keep part of them."""

from jaxsparse.kv.cache import KVCache
from jaxsparse.kv.paged_cache import PagedKVCache
from jaxsparse.kv.eviction import (
    EvictedKVCache,
    attend_and_append,
    evicted_decode_attention,
    evicted_decode_step,
    heavy_hitter_append,
    snapkv_prefill,
    streaming_llm_append,
)

__all__ = ["EvictedKVCache", "KVCache", "PagedKVCache", "attend_and_append", "evicted_decode_attention",
           "evicted_decode_step", "heavy_hitter_append", "snapkv_prefill", "streaming_llm_append"]
