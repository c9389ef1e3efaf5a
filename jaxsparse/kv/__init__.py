"""KV caches for decoding, and the selection and eviction policies that read or keep part of them."""

from jaxsparse.kv.cache import KVCache

__all__ = ["KVCache"]
