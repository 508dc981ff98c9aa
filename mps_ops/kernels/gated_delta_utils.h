// Helpers shared by the gated-delta-rule kernels (DESIGN §5; CPU reference:
// torch_tq/backends/cpu/gated_delta_rule.py).
//
// Token rows: every [B, T, ...] tensor is read as B*T rows. Sequences are the B batch rows, or,
// with cu_seqlens (B = 1), the spans cu_seqlens[n] .. cu_seqlens[n+1]-1. Chunks of
// TQ_GDR_CHUNK tokens restart at every sequence start; a sequence's last chunk may be partial,
// and a sequence of length 0 has no chunk. The global chunk index c (0 .. NT-1, sequences in
// order) is the NT axis of h [B, NT, HV, K, V] (B = 1 with cu_seqlens, else NT = B*ceil(T/64)
// rows laid out as [B, ceil(T/64)]).
#pragma once

#include "utils.h"
#include "params.h"

// One sequence: its first token row in the flattened B*T axis and its length.
struct GdrSequence {
  uint start;
  uint length;
};

// Sequence n. `cu_seqlens` (int32, host-converted) is read only when has_cu_seqlens != 0.
inline GdrSequence gdr_sequence(uint n, uint tokens, uint has_cu_seqlens, const device int* cu_seqlens) {
  if (has_cu_seqlens == 0) return GdrSequence{n * tokens, tokens};
  const uint start = uint(cu_seqlens[n]);
  return GdrSequence{start, uint(cu_seqlens[n + 1]) - start};
}

// One chunk: its sequence, its first token row (flattened B*T axis), its length (1..64).
struct GdrChunk {
  uint sequence;
  uint start;
  uint length;
  uint first_of_sequence;  // 1 for the sequence's first chunk
};

// Global chunk c. Without cu_seqlens: B rows of ceil(T/64) chunks. With it: a linear scan over
// the N sequences (N is small; every thread of a threadgroup computes the same answer).
inline GdrChunk gdr_chunk(uint c, uint tokens, uint sequences, uint has_cu_seqlens, const device int* cu_seqlens) {
  if (has_cu_seqlens == 0) {
    const uint per_row = (tokens + TQ_GDR_CHUNK - 1) / TQ_GDR_CHUNK;
    const uint b = c / per_row, j = c % per_row;
    return GdrChunk{b, b * tokens + j * TQ_GDR_CHUNK, min(uint(TQ_GDR_CHUNK), tokens - j * TQ_GDR_CHUNK), j == 0 ? 1u : 0u};
  }
  uint first = 0;  // global index of sequence n's first chunk
  for (uint n = 0; n < sequences; ++n) {
    const uint start = uint(cu_seqlens[n]);
    const uint length = uint(cu_seqlens[n + 1]) - start;
    const uint count = (length + TQ_GDR_CHUNK - 1) / TQ_GDR_CHUNK;
    if (c < first + count) {
      const uint j = c - first;
      return GdrChunk{n, start + j * TQ_GDR_CHUNK, min(uint(TQ_GDR_CHUNK), length - j * TQ_GDR_CHUNK), j == 0 ? 1u : 0u};
    }
    first += count;
  }
  return GdrChunk{sequences, 0, 0, 0};  // c >= NT: no chunk (the plan never launches one)
}
