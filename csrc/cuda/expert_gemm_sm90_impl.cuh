// Included first (before any other header) by the TUs that instantiate the sm_90a grouped-GEMM templates:
// expert_gemm_sm90_{bf16,fp16,swap,pingpong}.cu, each a few instantiations so that they compile in parallel.
// Release device code whatever the build flags: CuTe's debug asserts (e.g. in the epilogue's smem swizzle)
// put an __assertfail call inside the kernel, and ptxas then serializes every wgmma of the mainloop
// ("wgmma pipeline crossing function boundary", warning C7510).
#pragma once
#ifndef NDEBUG
#define NDEBUG
#endif
#define MOELORA_EXPERT_GEMM_SM90_IMPL
#include "expert_gemm_sm90.cuh"
