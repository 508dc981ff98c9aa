// Parameter structs and layout constants shared by the Metal kernels and the C++17 launch plans.
//
// This header compiles under Metal (`__METAL_VERSION__`) and as plain C++17, so every struct
// exists once (ATen's EmbeddingBag.h pattern). Each struct is sent with one setBytes; all fields
// are 32-bit, so the Metal and C++ layouts are identical (checked by static_assert in the plans).
//
// Buffer binding order of each kernel is written down next to its Params struct; the kernel's
// [[buffer(n)]], the launch plan and the simulator launcher all follow it.
#pragma once

#if defined(__METAL_VERSION__)
typedef uint tq_uint;
typedef int tq_int;
#define TQ_CONSTEXPR constant constexpr
#else
#include <cstdint>
typedef uint32_t tq_uint;
typedef int32_t tq_int;
#define TQ_CONSTEXPR constexpr
#endif

// bfloat needs MSL 3.1 (macOS 14); Metal defines __HAVE_BFLOAT__ when the type exists, and the
// bfloat16 instantiations are compiled only then (the host reports a clear error otherwise).
#if defined(__HAVE_BFLOAT__)
#define TQ_IF_BFLOAT(x) x
#else
#define TQ_IF_BFLOAT(x)
#endif

// Lane layout used by every TurboQuant kernel: a lane owns TQ_LANE_VALUES(D) consecutive
// coordinates of one vector (8 for D <= 256, 16 for D = 512). Eight coordinates of a b-bit code
// are exactly b bytes, so a lane reads and writes whole bytes of the packed row for every b, and
// a 32-lane simdgroup holds 256 coordinates: 256 / D vectors at once for D <= 256, one for D = 512.
#define TQ_LANE_VALUES(D) ((D) == 512 ? 16 : 8)

// Simdgroups per threadgroup of the quantize / dequantize kernels: 4 x 32 = 128 threads, a
// common occupancy sweet spot on Apple GPUs; one vector block per lane group needs no barrier.
TQ_CONSTEXPR tq_uint TQ_QUANT_SIMDGROUPS = 4;

// Threads per threadgroup of kv_cache_copy (one element per thread).
TQ_CONSTEXPR tq_uint TQ_COPY_THREADS = 256;

// Simdgroups per threadgroup of flash_attn_vec_tq: each scans a disjoint subset of the keys of
// the threadgroup's split; their softmax states merge in threadgroup memory (no partial traffic).
TQ_CONSTEXPR tq_uint TQ_ATTN_SIMDGROUPS = 4;

// Query rows (GQA heads x Lq of one KV head) per threadgroup, i.e. read together with one pass
// over the KV head: each row keeps a VPL-float output accumulator per lane in registers (the
// rotated q sits in threadgroup memory) and NSG x D floats of threadgroup memory for the final
// merge. 8 rows cover GQA groups up to 8 for D <= 128 within 32 KB; D = 256 and 512 take 4 and 2.
// A tile with fewer rows stops its row loops early (no cost for the missing rows).
#define TQ_ATTN_TILE_ROWS(D) ((D) <= 128 ? 8 : ((D) == 256 ? 4 : 2))

// Simdgroups per threadgroup of flash_attn_vec_tq_reduce.
TQ_CONSTEXPR tq_uint TQ_REDUCE_SIMDGROUPS = 2;

// tq.kv_cache_copy: cast-and-copy src[:, first:] into ring slots of a [B, Hkv, C, D] cache.
// Buffers: 0 src [B, T, Hkv, D] (contiguous), 1 cache [B, Hkv, C, D], 2 params.
struct KvCacheCopyParams {
  tq_uint num_elements;  // B * Tw * Hkv * D, Tw = tokens written
  tq_uint tokens;        // T (src tokens)
  tq_uint tokens_written;  // Tw = T - first
  tq_uint first;         // index of the first src token kept (T > C on a ring write)
  tq_uint kv_heads;      // Hkv
  tq_uint head_dim;      // D
  tq_uint capacity;      // C
  tq_uint first_slot;    // slot of token `first`: (write_pos + first) mod C
};

// dtype codes of the full-precision window buffers (sink/recent), read and written through
// tq::load_window / tq::store_window: a runtime parameter, not a template one, so that the window
// dtype does not multiply the instantiations (it costs one uniform branch per access).
TQ_CONSTEXPR tq_uint TQ_WINDOW_FLOAT32 = 0;
TQ_CONSTEXPR tq_uint TQ_WINDOW_FLOAT16 = 1;
TQ_CONSTEXPR tq_uint TQ_WINDOW_BFLOAT16 = 2;

// tq.hadamard_quantize_kv: rotate, normalise, quantize and pack new vectors per (b, h); optionally
// centre them first (offset), store corrected norms and write the rotated vectors to the
// full-precision sink / recent windows, all in one launch.
// Buffers: 0 src [B, T, Hkv, D] (contiguous), 1 codes [B, Hkv, C, D*b/8] uint8,
// 2 norms [B, Hkv, C, D/R] float32, 3 signs [D] float32 (the op's, or the canonical ones),
// 4 codebook float32 [2^b centroids, 2^b - 1 decision boundaries], 5 params,
// 6 offset [B, Hkv, D] float32 (dummy when has_offset = 0), 7 sink [B, Hkv, S, D] (dummy when
// sink_tokens = 0), 8 recent [B, Hkv, W, D] (dummy when recent_len = 0).
// Tokens processed per batch (tokens_written of them): the `head` tokens 0 .. head_tokens-1 (sink
// tokens that a ring write of T > C drops from the codes; 0 otherwise), then tokens first .. T-1.
// A token t writes the codes when t >= first, the sink when t < sink_tokens, the ring when
// t >= recent_first.
struct HadamardQuantizeKvParams {
  tq_uint num_rows;      // B * tokens_written * Hkv vectors
  tq_uint tokens;        // T
  tq_uint tokens_written;  // head_tokens + T - first
  tq_uint first;         // first src token kept by the codes
  tq_uint kv_heads;      // Hkv
  tq_uint capacity;      // C
  tq_uint first_slot;    // (write_pos + first) mod C
  float inv_sqrt_r;      // float32(1 / sqrt(R)), as the CPU reference rounds it
  float sqrt_r;          // float32(sqrt(R))
  tq_uint has_offset;    // 1: subtract buffer 6 before rotating
  tq_uint norm_correction;  // 1: store n * sqrt(R) / ||c[code]|| per block
  tq_uint head_tokens;   // tokens 0 .. head_tokens-1 processed before `first` (sink writes only)
  tq_uint sink_tokens;   // tokens 0 .. sink_tokens-1 go to sink slot write_pos + t (0 = no sink write)
  tq_uint sink_len;      // S
  tq_uint sink_pos;      // write_pos (< S when sink_tokens > 0)
  tq_uint sink_dtype;    // TQ_WINDOW_*
  tq_uint recent_len;    // W (0 = no recent ring)
  tq_uint recent_first;  // first token written to the ring: max(0, T - W)
  tq_uint recent_first_slot;  // (write_pos + recent_first) mod W
  tq_uint recent_dtype;  // TQ_WINDOW_*
  tq_uint blocks_per_threadgroup;  // row blocks (TQ_QUANT_SIMDGROUPS x 256 / D rows) each threadgroup walks
};

// tq.dequantize_kv: decode `length` positions starting at `start` (slot p mod C).
// Buffers: 0 codes, 1 norms, 2 signs [D] float32, 3 codebook, 4 out
// [B, Hkv, length, D] float32, 5 params.
struct DequantizeKvParams {
  tq_uint num_rows;      // B * Hkv * length
  tq_uint length;
  tq_uint capacity;      // C
  tq_uint first_slot;    // start mod C
  tq_uint rotated;       // 1: return y-hat (rotated domain); 0: x-hat
  float inv_sqrt_r;
  float sqrt_r;
};

// tq.flash_attn_vec_tq, two launches.
// Main: grid (num_splits, Hkv * row_tiles, B), TQ_ATTN_SIMDGROUPS simdgroups.
//   Buffers: 0 q [B, Hq, Lq, D] (contiguous), 1 k_codes, 2 k_norms, 3 v_codes, 4 v_norms,
//   5 kv_start [B] int64 (dummy when has_kv_start = 0), 6 signs [D] float32,
//   7 codebook of the keys' bits, 8 partial_o [B*Hq*Lq, num_splits, D] float32 (scratch 0),
//   9 partial_ml [B*Hq*Lq, num_splits, 2] float32 (scratch 1), 10 params,
//   11 codebook of the values' bits (v_bits), 12 k_sink, 13 v_sink [B, Hkv, S, D] (dummies when
//   sink_len = 0), 14 k_recent, 15 v_recent [B, Hkv, W, D] (dummies when recent_len = 0).
// Reduce: grid (ceil(B*Hq*Lq / rows per threadgroup)), TQ_REDUCE_SIMDGROUPS simdgroups.
//   Buffers: 0 partial_o, 1 partial_ml, 2 signs [D] float32, 3 out [B, Hq, Lq, D] in q's dtype, 4 params.
// A row is one (b, query head, query); row index (b * Hkv + kvh) * rows + g * Lq + i equals the
// flat row of q and out because query head = kvh * group + g.
// A visible position j is read from the sink when j < sink_len, else from the recent ring (slot
// j mod W) when j >= recent_lo, else from the codes (slot j mod C).
struct FlashAttnVecTqParams {
  tq_uint batch;         // B
  tq_uint q_heads;       // Hq
  tq_uint kv_heads;      // Hkv
  tq_uint q_len;         // Lq
  tq_uint capacity;      // C
  tq_uint rows;          // group * Lq query rows per KV head
  tq_uint row_tiles;     // ceil(rows / TQ_ATTN_TILE_ROWS(D))
  tq_uint num_splits;    // NWG: threadgroups sharing the key range of one (b, kvh, tile)
  tq_uint keys_per_split;  // ceil((key_hi - key_lo) / num_splits)
  tq_uint total_rows;    // B * Hq * Lq
  tq_int kv_len;         // tokens written so far (< 2^31, checked by the plan)
  tq_int key_lo;         // first position any query may see: max(valid lo, window start)
  tq_int key_hi;         // kv_len
  tq_int sliding_window; // 0 = full attention
  tq_uint has_kv_start;
  float scale;
  float softcap;         // 0 = off
  float inv_sqrt_r;
  tq_uint key_lo_slot;   // key_lo mod C; the scanned range is shorter than C, so slots wrap at most once
  tq_uint has_lse;       // the reduce kernel writes each row's log-sum-exp to buffer(5)
  tq_uint v_bits;        // the values' code width (the keys' is a template parameter)
  tq_int sink_len;       // S (0 = no sink buffers)
  tq_int recent_lo;      // first position held by the recent ring: max(0, kv_len - W); kv_len when W = 0
  tq_uint recent_len;    // W (0 = no recent buffers)
  tq_uint recent_lo_slot;  // recent_lo mod W (0 when W = 0); ring positions wrap at most once from there
  tq_uint k_sink_dtype;  // TQ_WINDOW_* of buffers 12 .. 15
  tq_uint v_sink_dtype;
  tq_uint k_recent_dtype;
  tq_uint v_recent_dtype;
};

// ---- gated delta rule ------------------------------------------------------------------------
// Chunk length of the chunked form (torch_tq/_gated_delta_validation.py CHUNK_SIZE).
#define TQ_GDR_CHUNK 64
// The Params structs of the gated-delta kernels live in gated_delta_params.h.
#include "gated_delta_params.h"
