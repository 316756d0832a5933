// Small device helpers shared by the CUDA stages: element conversion, 16-byte vectors, cp.async.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace moelora::cuda {

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// Two floats rounded to the 16-bit type and packed into one register, the first in the low half, in one
// instruction (F2FP) instead of two conversions and a permute; the same rounding (to nearest even).
template <typename T> __device__ __forceinline__ uint32_t round_pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t round_pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t round_pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
// The low / high 16-bit element of a packed register, as float.
template <typename T> __device__ __forceinline__ float low_float(uint32_t w);
template <typename T> __device__ __forceinline__ float high_float(uint32_t w);
template <> __device__ __forceinline__ float low_float<__nv_bfloat16>(uint32_t w) { return __uint_as_float(w << 16); }
template <> __device__ __forceinline__ float high_float<__nv_bfloat16>(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
template <> __device__ __forceinline__ float low_float<__half>(uint32_t w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
}
template <> __device__ __forceinline__ float high_float<__half>(uint32_t w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}

// sum over i < n of src[i * stride], in i order (the split-K partials' fixed reduction order), with the
// loads of up to 8 terms in flight at once instead of one dependent round trip per term.
__device__ __forceinline__ float sum_splits(const float* src, int n, int64_t stride) {
  float v = 0.f;
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    float t[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) t[u] = src[(i + u) * stride];
#pragma unroll
    for (int u = 0; u < 8; ++u) v += t[u];
  }
  for (; i < n; ++i) v += src[i * stride];
  return v;
}

// Eight 16-bit elements moved as one 16-byte access.
template <typename T>
struct alignas(16) Vec8 {
  T v[8];
};

// Asynchronous 16-byte global->shared copy; when `pred` is false the destination is zero-filled
// and nothing is read (src-size 0), so tails need no separate code path.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool pred) {
  unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

}  // namespace moelora::cuda
