// mma.sync m16n8k16 and its register operands, for kernels that load a weight matrix straight from global
// memory into fragments (lora_rows_mma.cuh, expert_gemv.cu): the weight is the 16-row "A" operand, up to 8
// token rows are the "B" operand's N.
//
// K order: a dot product does not depend on the order of k, so each lane loads 8 consecutive k (16 bytes)
// and the mma sees them as its k = {2q, 2q+1, 8+2q, 9+2q} of two consecutive k16 steps; as long as the A and
// B fragments use the same mapping the result is the plain dot product over those 32 k.
#pragma once
#include <cstdint>
#include <type_traits>

#include "cuda_utils.cuh"

namespace moelora::cuda::mma_operands {

// c += a (16x16, row) * b (16x8, col), fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// Two 16-bit elements in one register, the first in the low half (the mma fragment order).
__device__ __forceinline__ uint32_t pack2(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(lo)) | (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
}
__device__ __forceinline__ uint32_t pack2(__half lo, __half hi) {
  return static_cast<uint32_t>(__half_as_ushort(lo)) | (static_cast<uint32_t>(__half_as_ushort(hi)) << 16);
}

// V consecutive 16-bit elements (V = 4 or 8) as V/2 packed registers: one 8/16-byte load when `vec`
// and all are valid, else `valid` scalar loads and zeros.
template <typename T, int V>
struct Pack {
  uint32_t w[V / 2];
};
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* src, bool vec, int valid) {
  Pack<T, V> p;
  if (vec && valid == V) {
    if constexpr (V == 8) {
      const uint4 v = *reinterpret_cast<const uint4*>(src);
      p.w[0] = v.x; p.w[1] = v.y; p.w[2] = v.z; p.w[3] = v.w;
    } else {
      const uint2 v = *reinterpret_cast<const uint2*>(src);
      p.w[0] = v.x; p.w[1] = v.y;
    }
    return p;
  }
  T e[V];
#pragma unroll
  for (int i = 0; i < V; ++i) e[i] = i < valid ? src[i] : from_float<T>(0.f);
#pragma unroll
  for (int i = 0; i < V / 2; ++i) p.w[i] = pack2(e[2 * i], e[2 * i + 1]);
  return p;
}

// A streamed operand's 16-byte load (a weight row read once): how it asks for its bytes. kLoadL2Fill asks the L2 for
// 256-byte fills (`.L2::256B`) instead of the requested sectors; kLoadNoL1 also allocates no L1 line
// (`.L1::no_allocate`). The data is the same; what they change is measured (expert_gemv.cu, benchmarks/NOTES.md v31;
// on the LoRA few-rows kernels' adapter loads they changed nothing, v31).
constexpr int kLoadPlain = 0, kLoadL2Fill = 1, kLoadNoL1 = 2;
template <typename T, int kLoad>
__device__ __forceinline__ Pack<T, 8> load_stream_pack(const T* src, bool vec, int valid) {
  if constexpr (kLoad != kLoadPlain) {
    if (vec && valid == 8) {
      Pack<T, 8> p;
      if constexpr (kLoad == kLoadL2Fill)
        asm volatile("ld.global.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(p.w[0]), "=r"(p.w[1]), "=r"(p.w[2]), "=r"(p.w[3]) : "l"(src));
      else
        asm volatile("ld.global.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(p.w[0]), "=r"(p.w[1]), "=r"(p.w[2]), "=r"(p.w[3]) : "l"(src));
      return p;
    }
  }
  return load_pack<T, 8>(src, vec, valid);
}

}  // namespace moelora::cuda::mma_operands
