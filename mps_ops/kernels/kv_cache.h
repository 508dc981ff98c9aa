// tq.kv_cache_copy: cast-and-copy new full-precision K or V vectors into ring slots of a cache.
#pragma once

#include <metal_stdlib>

#include "params.h"

using namespace metal;

// One thread per copied element; element e = ((b * Tw + t) * Hkv + h) * D + d.
template <typename SrcT, typename CacheT>
[[kernel]] void kv_cache_copy(
    device const SrcT* src [[buffer(0)]],
    device CacheT* cache [[buffer(1)]],
    constant KvCacheCopyParams& p [[buffer(2)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid >= p.num_elements) {
    return;
  }
  const uint d = gid % p.head_dim;
  const uint row = gid / p.head_dim;
  const uint h = row % p.kv_heads;
  const uint bt = row / p.kv_heads;
  const uint t = bt % p.tokens_written;
  const uint b = bt / p.tokens_written;
  const ulong src_index = ((ulong(b) * p.tokens + p.first + t) * p.kv_heads + h) * p.head_dim + d;
  const uint slot = (p.first_slot + t) % p.capacity;
  const ulong cache_index = ((ulong(b) * p.kv_heads + h) * p.capacity + slot) * p.head_dim + d;
  // Through float: exact for every pair, and round-to-nearest-even on narrowing like torch.
  cache[cache_index] = static_cast<CacheT>(static_cast<float>(src[src_index]));
}
