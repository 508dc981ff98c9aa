// Shared helpers of the TurboQuant kernels: lane layout, Walsh-Hadamard butterflies, lane-group
// reductions, nearest-centroid search and dense bit packing. The math is DESIGN.md §5; the CPU
// reference (torch_tq/backends/cpu/turboquant.py) is the spec these helpers reproduce bit for bit
// where the reference is deterministic (butterfly order, scalings, packing).
#pragma once

#include <metal_stdlib>

#include "params.h"

using namespace metal;

namespace tq {

// How one vector of D coordinates maps onto simdgroup lanes (see TQ_LANE_VALUES in params.h).
// Static members are program-scope variables, which Metal places in the constant address space.
template <int D>
struct RowLayout {
  static constant constexpr int R = D < 256 ? D : 256;        // rotation block
  static constant constexpr int NB = D / R;                   // rotation blocks (norms) per vector
  static constant constexpr int VPL = TQ_LANE_VALUES(D);      // consecutive coordinates per lane
  static constant constexpr int LANES = D / VPL;              // lanes per vector (8, 16, 32, 32)
  static constant constexpr int ROWS = 32 / LANES;            // vectors per simdgroup (4, 2, 1, 1)
  static constant constexpr int BLOCK_LANES = R / VPL;        // lanes per rotation block
};

// Unnormalised Sylvester Walsh-Hadamard transform of each R-block, in the CPU reference's stage
// order (h = 1, 2, 4, ...; pair (a, b) -> (a + b, a - b) with a at the index whose bit h is clear).
// Stages h < VPL stay inside the lane; the others pair lane l with lane l ^ (h / VPL), which
// never leaves the lane's rotation block. Every lane of the simdgroup must call this.
template <int VPL, int R>
inline void fwht(thread float (&v)[VPL], uint lane) {
  for (int h = 1; h < VPL && h < R; h <<= 1) {
    for (int i = 0; i < VPL; ++i) {
      if ((i & h) == 0) {
        const float a = v[i];
        const float b = v[i + h];
        v[i] = a + b;
        v[i + h] = a - b;
      }
    }
  }
  for (int h = VPL; h < R; h <<= 1) {
    const ushort mask = ushort(h / VPL);
    const bool upper = (lane & mask) != 0;
    for (int i = 0; i < VPL; ++i) {
      const float other = simd_shuffle_xor(v[i], mask);
      v[i] = upper ? other - v[i] : v[i] + other;
    }
  }
}

// Sum over aligned groups of LANES lanes; every lane of a group gets the same bits.
template <int LANES>
inline float group_sum(float x) {
  if (LANES == 32) {
    return simd_sum(x);
  }
  for (ushort m = 1; m < LANES; m <<= 1) {
    x += simd_shuffle_xor(x, m);
  }
  return x;
}

// Maximum over aligned groups of LANES lanes.
template <int LANES>
inline float group_max(float x) {
  if (LANES == 32) {
    return simd_max(x);
  }
  for (ushort m = 1; m < LANES; m <<= 1) {
    x = max(x, simd_shuffle_xor(x, m));
  }
  return x;
}

// Index of the nearest centroid = number of decision boundaries strictly below u (ties go to the
// lower index, exactly torch.bucketize(u, boundaries, right=False)); binary lifting over the
// 2^BITS - 1 sorted boundaries.
template <int BITS>
inline uint nearest_code(float u, device const float* boundaries) {
  uint code = 0;
  for (uint step = (1u << BITS) >> 1; step > 0; step >>= 1) {
    if (boundaries[code + step - 1] < u) {
      code += step;
    }
  }
  return code;
}

// Codes of the VPL coordinates starting at d0 (a multiple of 8) from a packed row: each 8
// coordinates are BITS whole bytes of the little-endian bitstream (code i at bits i*b .. i*b+b-1).
template <int BITS, int VPL>
inline void load_codes(device const uchar* row, uint d0, thread uint (&codes)[VPL]) {
  for (int k = 0; k < VPL / 8; ++k) {
    device const uchar* bytes = row + (d0 / 8 + k) * BITS;
    ulong acc = 0;
    for (int j = 0; j < BITS; ++j) {
      acc |= ulong(bytes[j]) << (8 * j);
    }
    for (int i = 0; i < 8; ++i) {
      codes[8 * k + i] = uint(acc >> (i * BITS)) & ((1u << BITS) - 1u);
    }
  }
}

template <int BITS, int VPL>
inline void store_codes(device uchar* row, uint d0, thread const uint (&codes)[VPL]) {
  for (int k = 0; k < VPL / 8; ++k) {
    ulong acc = 0;
    for (int i = 0; i < 8; ++i) {
      acc |= ulong(codes[8 * k + i]) << (i * BITS);
    }
    device uchar* bytes = row + (d0 / 8 + k) * BITS;
    for (int j = 0; j < BITS; ++j) {
      bytes[j] = uchar(acc >> (8 * j));
    }
  }
}

// load_codes with the code width as a runtime value (uniform over the dispatch, so the switch is
// a uniform branch and each case is the unrolled unpacker of its width): lets one kernel read a
// second code width (flash_attn_vec_tq's values) without an instantiation per (bits, v_bits) pair.
template <int VPL>
inline void load_codes_bits(device const uchar* row, uint d0, uint bits, thread uint (&codes)[VPL]) {
  switch (bits) {
    case 2: load_codes<2, VPL>(row, d0, codes); break;
    case 3: load_codes<3, VPL>(row, d0, codes); break;
    case 4: load_codes<4, VPL>(row, d0, codes); break;
    case 5: load_codes<5, VPL>(row, d0, codes); break;
    case 6: load_codes<6, VPL>(row, d0, codes); break;
    default: load_codes<8, VPL>(row, d0, codes); break;
  }
}

// Full-precision window buffers (float32, float16 or bfloat16, TQ_WINDOW_* in params.h) are bound
// as bytes and converted here, so their dtype is a runtime parameter. bfloat16 goes through its
// bits (exact both ways; round to nearest even like torch), which needs no MSL 3.1 `bfloat`.
inline float bfloat_bits_to_float(ushort bits) { return as_type<float>(uint(bits) << 16); }

inline ushort float_to_bfloat_bits(float f) {
  const uint u = as_type<uint>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return ushort(0x7fc0);  // NaN, as torch converts it
  }
  return ushort((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// VPL consecutive elements starting at element `index` of a window buffer, as float.
template <int VPL>
inline void load_window(device const uchar* buf, uint dtype, ulong index, thread float (&out)[VPL]) {
  if (dtype == TQ_WINDOW_FLOAT32) {
    device const float* x = reinterpret_cast<device const float*>(buf) + index;
    for (int i = 0; i < VPL; ++i) {
      out[i] = x[i];
    }
  } else if (dtype == TQ_WINDOW_FLOAT16) {
    device const half* x = reinterpret_cast<device const half*>(buf) + index;
    for (int i = 0; i < VPL; ++i) {
      out[i] = float(x[i]);
    }
  } else {
    device const ushort* x = reinterpret_cast<device const ushort*>(buf) + index;
    for (int i = 0; i < VPL; ++i) {
      out[i] = bfloat_bits_to_float(x[i]);
    }
  }
}

// Stores VPL floats at element `index` of a window buffer, rounded to its dtype.
template <int VPL>
inline void store_window(device uchar* buf, uint dtype, ulong index, thread const float (&v)[VPL]) {
  if (dtype == TQ_WINDOW_FLOAT32) {
    device float* x = reinterpret_cast<device float*>(buf) + index;
    for (int i = 0; i < VPL; ++i) {
      x[i] = v[i];
    }
  } else if (dtype == TQ_WINDOW_FLOAT16) {
    device half* x = reinterpret_cast<device half*>(buf) + index;
    for (int i = 0; i < VPL; ++i) {
      x[i] = half(v[i]);
    }
  } else {
    device ushort* x = reinterpret_cast<device ushort*>(buf) + index;
    for (int i = 0; i < VPL; ++i) {
      x[i] = float_to_bfloat_bits(v[i]);
    }
  }
}

// The rotation signs into threadgroup memory, read once per threadgroup rather than once per
// vector; every thread of the threadgroup must call it.
template <int D, uint THREADS, typename Signs>
inline void load_signs(Signs tg_signs, device const float* signs, uint tid) {
  for (uint d = tid; d < uint(D); d += THREADS) {
    tg_signs[d] = signs[d];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

}  // namespace tq
