// Standalone (torch-free) check of the sm_90a expert grouped GEMM (csrc/cuda/expert_gemm_sm90*.cu).
// Build: bash tools/build_expert_gemm_selftest.sh OUT_BINARY   (needs an H100/H200 to run)
//
// For bf16 and fp16, every case runs with each tile configuration (ExpertGemmParams::config: small-M, large-M,
// large-M pingpong and the swapped-operand one), against a fp32 GPU reference:
// relative Frobenius error ||D - ref|| / ||ref||, plus a guard region after D that must stay untouched
// (TMA stores must clip at each expert's last row). One case is captured in a CUDA graph and replayed
// after rewriting expert_offsets in place (new routing, no re-capture). Exit code 0 only if all pass.
// Then a few benchmark-like shapes are timed with cudaEvents, as CUDA-graph replays (GPU time) and eager
// (with host overhead): TFLOP/s and TB/s of touched bytes (active experts' W + A + D).
// Usage: selftest [--no-timing]
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "../csrc/cuda/expert_gemm_sm90.h"

namespace mc = moelora::cuda;

constexpr int kNumConfigs = 4;
constexpr mc::ExpertGemmConfig kConfigs[kNumConfigs] = {mc::ExpertGemmConfig::SmallM, mc::ExpertGemmConfig::LargeM,
                                                        mc::ExpertGemmConfig::LargeMPingpong,
                                                        mc::ExpertGemmConfig::SwapAB32};
constexpr const char* kConfigNames[kNumConfigs] = {"smallM", "largeM", "largePP", "swap32"};

#define CK(x)                                                                                   \
  do {                                                                                          \
    cudaError_t e_ = (x);                                                                       \
    if (e_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__,     \
                   __LINE__, #x);                                                               \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)

// ---- device helpers ------------------------------------------------------------------------------
template <class T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <class T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f(float v) { return __float2half(v); }

__device__ __forceinline__ uint32_t hash32(uint64_t x) {
  x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

// Uniform in [-scale, scale).
template <class T>
__global__ void fill_random(T* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    p[i] = from_f<T>(scale * ((hash32(seed * 0x9E3779B97F4A7C15ULL + i) >> 8) * (2.0f / 16777216.0f) - 1.0f));
}

// ref[r, n] = sum_k A[r, k] * W[e(r), n, k] in fp32. The 16x16 A tile goes through shared memory; each
// thread reads its own W row (rows of one tile may belong to different experts). row_expert from the host.
template <class T>
__global__ void reference_gemm(const T* A, const T* W, const int* row_expert, float* ref, int rows, int N, int K) {
  __shared__ float sa[16][17];
  const int r = blockIdx.y * 16 + threadIdx.y;
  const int n = blockIdx.x * 16 + threadIdx.x;
  const int e = r < rows ? row_expert[r] : 0;
  float acc = 0.f;
  for (int k0 = 0; k0 < K; k0 += 16) {
    sa[threadIdx.y][threadIdx.x] = (r < rows && k0 + (int)threadIdx.x < K) ? to_f(A[(size_t)r * K + k0 + threadIdx.x]) : 0.f;
    __syncthreads();
    if (r < rows && n < N) {
      const T* w = W + ((size_t)e * N + n) * K + k0;
      const int kk = min(16, K - k0);
      for (int j = 0; j < kk; ++j) acc += sa[threadIdx.y][j] * to_f(w[j]);
    }
    __syncthreads();
  }
  if (r < rows && n < N) ref[(size_t)r * N + n] = acc;
}

// ---- host side ---------------------------------------------------------------------------------------
struct Case {
  std::string name;
  int E, N, K;
  std::vector<int> counts;  // rows per expert
};

static std::vector<int> random_counts(int E, int rows, int zero_every, std::mt19937& rng) {
  std::vector<int> c(E, 0);
  std::vector<int> live;
  for (int e = 0; e < E; ++e)
    if (zero_every <= 0 || e % zero_every != 0) live.push_back(e);
  std::uniform_int_distribution<int> pick(0, (int)live.size() - 1);
  for (int i = 0; i < rows; ++i) c[live[pick(rng)]]++;
  return c;
}

static std::vector<int> offsets_of(const std::vector<int>& counts) {
  std::vector<int> off(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) off[e + 1] = off[e] + counts[e];
  return off;
}

static float bits_to_float(uint16_t b, mc::DType dt) {
  if (dt == mc::DType::BF16) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half_raw raw;
  raw.x = b;
  return __half2float(__half(raw));
}

struct Bufs {
  void* A = nullptr; void* W = nullptr; void* D = nullptr; float* ref = nullptr;
  int* off = nullptr; int* row_expert = nullptr; void* ws = nullptr;
  size_t ws_bytes = 0;
};

static const int kGuardRows = 64;

template <class T>
static void launch_reference(const Bufs& b, int rows, int N, int K, cudaStream_t s) {
  if (rows == 0) return;
  dim3 block(16, 16), grid((N + 15) / 16, (rows + 15) / 16);
  reference_gemm<T><<<grid, block, 0, s>>>((const T*)b.A, (const T*)b.W, b.row_expert, b.ref, rows, N, K);
  CK(cudaGetLastError());
}

// Compares D[0:rows] to ref and checks the guard rows after D. Returns rel error (or +inf on guard/NaN).
static double compare(const Bufs& b, int rows, int N, mc::DType dt, std::string* why) {
  const size_t n_out = (size_t)rows * N, n_guard = (size_t)kGuardRows * N;
  std::vector<uint16_t> d(n_out + n_guard);
  std::vector<float> ref(n_out);
  CK(cudaMemcpy(d.data(), b.D, d.size() * 2, cudaMemcpyDeviceToHost));
  if (n_out) CK(cudaMemcpy(ref.data(), b.ref, n_out * 4, cudaMemcpyDeviceToHost));
  for (size_t i = n_out; i < d.size(); ++i)
    if (d[i] != 0xFFFF) { *why = "guard rows after D were written"; return INFINITY; }
  double num = 0, den = 0;
  for (size_t i = 0; i < n_out; ++i) {
    const float v = bits_to_float(d[i], dt);
    if (!std::isfinite(v)) { *why = "non-finite output (row never written?)"; return INFINITY; }
    num += (double)(v - ref[i]) * (v - ref[i]);
    den += (double)ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

template <class T>
static bool run_case(const Case& c, mc::DType dt, int sm_count, cudaStream_t s, bool graph_replay, std::mt19937& rng) {
  const std::vector<int> off = offsets_of(c.counts);
  const int rows = off.back();
  const char* dname = dt == mc::DType::BF16 ? "bf16" : "fp16";
  // bf16 keeps 8 mantissa bits, fp16 11: the output rounding alone gives ~2^-9 / 2^-12 relative-norm
  // error; fp32 accumulation order differences are far below that.
  const double tol = dt == mc::DType::BF16 ? 5e-3 : 2e-3;
  Bufs b;
  CK(cudaMalloc(&b.A, std::max<size_t>(1, (size_t)rows * c.K) * 2));
  CK(cudaMalloc(&b.W, (size_t)c.E * c.N * c.K * 2));
  CK(cudaMalloc(&b.D, (size_t)(rows + kGuardRows) * c.N * 2));
  CK(cudaMalloc(&b.ref, std::max<size_t>(1, (size_t)rows * c.N) * 4));
  CK(cudaMalloc(&b.off, (c.E + 1) * sizeof(int)));
  CK(cudaMalloc(&b.row_expert, std::max(1, rows) * sizeof(int)));
  b.ws_bytes = mc::expert_gemm_sm90_workspace_bytes(c.E, sm_count);
  CK(cudaMalloc(&b.ws, b.ws_bytes));
  // Scale so outputs are O(1): |a|,|w| < 1/K^(1/4).
  const float sc = 1.0f / std::sqrt(std::sqrt((float)c.K));
  if (rows) fill_random<T><<<1024, 256, 0, s>>>((T*)b.A, (size_t)rows * c.K, rng(), sc);
  fill_random<T><<<1024, 256, 0, s>>>((T*)b.W, (size_t)c.E * c.N * c.K, rng(), sc);
  CK(cudaGetLastError());

  auto upload_routing = [&](const std::vector<int>& o) {
    std::vector<int> re(std::max(1, rows));
    for (int e = 0; e < c.E; ++e)
      for (int r = o[e]; r < o[e + 1]; ++r) re[r] = e;
    CK(cudaMemcpyAsync(b.off, o.data(), o.size() * sizeof(int), cudaMemcpyHostToDevice, s));
    CK(cudaMemcpyAsync(b.row_expert, re.data(), re.size() * sizeof(int), cudaMemcpyHostToDevice, s));
    CK(cudaStreamSynchronize(s));  // host vectors go out of scope
  };
  upload_routing(off);
  launch_reference<T>(b, rows, c.N, c.K, s);

  mc::ExpertGemmParams p{};
  p.A = b.A; p.W = b.W; p.D = b.D; p.expert_offsets = b.off;
  p.num_experts = c.E; p.N = c.N; p.K = c.K; p.dtype = dt;

  bool ok_all = true;
  // Every tile config on every case.
  for (int h = 0; h < kNumConfigs; ++h) {
    p.config = kConfigs[h];
    CK(cudaMemsetAsync(b.D, 0xFF, (size_t)(rows + kGuardRows) * c.N * 2, s));
    cudaError_t err = mc::expert_gemm_sm90(p, b.ws, b.ws_bytes, sm_count, s);
    if (err == cudaSuccess) err = cudaStreamSynchronize(s);
    std::string why;
    double rel = INFINITY;
    if (err != cudaSuccess) why = std::string("error ") + cudaGetErrorName(err);
    else rel = compare(b, rows, c.N, dt, &why);
    const bool ok = err == cudaSuccess && rel <= tol;
    ok_all &= ok;
    std::printf("%-4s %-34s E=%-3d rows=%-6d N=%-5d K=%-5d %-6s rel_err=%.3e %s %s\n", dname, c.name.c_str(), c.E,
                rows, c.N, c.K, kConfigNames[h], rel, ok ? "PASS" : "FAIL", why.c_str());
    if (err != cudaSuccess && err != cudaErrorInvalidValue && err != cudaErrorNotSupported) std::exit(1);
  }

  if (graph_replay) {
    // Capture once with the current routing, then rewrite expert_offsets in place with a different
    // routing of the same total row count and replay: the device-built group table must follow.
    for (int h = 0; h < kNumConfigs; ++h) {
      p.config = kConfigs[h];
      cudaGraph_t g;
      cudaGraphExec_t ge;
      CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
      cudaError_t cap_err = mc::expert_gemm_sm90(p, b.ws, b.ws_bytes, sm_count, s);
      CK(cudaStreamEndCapture(s, &g));
      bool ok = cap_err == cudaSuccess;
      std::string why = ok ? "" : std::string("capture error ") + cudaGetErrorName(cap_err);
      double rel = INFINITY;
      if (ok) {
        CK(cudaGraphInstantiate(&ge, g, 0));
        std::vector<int> counts2 = c.counts;
        std::shuffle(counts2.begin(), counts2.end(), rng);  // same total rows, new owners
        const std::vector<int> off2 = offsets_of(counts2);
        upload_routing(off2);
        launch_reference<T>(b, rows, c.N, c.K, s);
        CK(cudaMemsetAsync(b.D, 0xFF, (size_t)(rows + kGuardRows) * c.N * 2, s));
        CK(cudaGraphLaunch(ge, s));
        CK(cudaStreamSynchronize(s));
        rel = compare(b, rows, c.N, dt, &why);
        ok = rel <= tol;
        CK(cudaGraphExecDestroy(ge));
      }
      CK(cudaGraphDestroy(g));
      ok_all &= ok;
      std::printf("%-4s %-34s E=%-3d rows=%-6d N=%-5d K=%-5d %-6s rel_err=%.3e %s %s\n", dname,
                  (c.name + " [graph replay, new routing]").c_str(), c.E, rows, c.N, c.K, kConfigNames[h], rel,
                  ok ? "PASS" : "FAIL", why.c_str());
    }
  }
  CK(cudaFree(b.A)); CK(cudaFree(b.W)); CK(cudaFree(b.D)); CK(cudaFree(b.ref));
  CK(cudaFree(b.off)); CK(cudaFree(b.row_expert)); CK(cudaFree(b.ws));
  return ok_all;
}

// Times one shape with each tile config forced; the config that Auto picks for rows_hint = rows is marked
// with '*', so the size rule can be checked.
template <class T>
static void time_case(const char* name, int E, int N, int K, int rows, int sm_count, cudaStream_t s, std::mt19937& rng) {
  // Uniform random routing, like top-k routing of random tokens.
  std::vector<int> counts = random_counts(E, rows, 0, rng);
  const std::vector<int> off = offsets_of(counts);
  int active = 0;
  for (int x : counts) active += x > 0;
  void *A, *W, *D, *ws;
  int* doff;
  CK(cudaMalloc(&A, std::max<size_t>(1, (size_t)rows * K) * 2));
  CK(cudaMalloc(&W, (size_t)E * N * K * 2));
  CK(cudaMalloc(&D, std::max<size_t>(1, (size_t)rows * N) * 2));
  CK(cudaMalloc(&doff, (E + 1) * sizeof(int)));
  const size_t wsb = mc::expert_gemm_sm90_workspace_bytes(E, sm_count);
  CK(cudaMalloc(&ws, wsb));
  fill_random<T><<<1024, 256, 0, s>>>((T*)A, (size_t)rows * K, 1, 0.1f);
  fill_random<T><<<1024, 256, 0, s>>>((T*)W, (size_t)E * N * K, 2, 0.1f);
  CK(cudaMemcpyAsync(doff, off.data(), off.size() * sizeof(int), cudaMemcpyHostToDevice, s));
  mc::ExpertGemmParams p{};
  p.A = A; p.W = W; p.D = D; p.expert_offsets = doff;
  p.num_experts = E; p.N = N; p.K = K;
  p.dtype = std::is_same<T, __nv_bfloat16>::value ? mc::DType::BF16 : mc::DType::FP16;
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  p.rows_hint = rows;
  const mc::ExpertGemmConfig auto_config = mc::expert_gemm_sm90_auto_config(p);
  for (int cfg = 0; cfg < kNumConfigs; ++cfg) {
    p.config = kConfigs[cfg];
    for (int i = 0; i < 3; ++i) CK(mc::expert_gemm_sm90(p, ws, wsb, sm_count, s));
    CK(cudaStreamSynchronize(s));
    const int iters = 20;
    // Eager: includes the host side of each call (TMA descriptor encode, launch of 2 kernels).
    CK(cudaEventRecord(e0, s));
    for (int i = 0; i < iters; ++i) CK(mc::expert_gemm_sm90(p, ws, wsb, sm_count, s));
    CK(cudaEventRecord(e1, s));
    CK(cudaEventSynchronize(e1));
    float ms_eager = 0;
    CK(cudaEventElapsedTime(&ms_eager, e0, e1));
    // Graph replay of the same calls: GPU time only, as the op runs under CUDA graphs.
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < iters; ++i) CK(mc::expert_gemm_sm90(p, ws, wsb, sm_count, s));
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    CK(cudaGraphLaunch(ge, s));
    CK(cudaStreamSynchronize(s));
    CK(cudaEventRecord(e0, s));
    CK(cudaGraphLaunch(ge, s));
    CK(cudaEventRecord(e1, s));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    const double t = ms / 1e3 / iters;
    const double flops = 2.0 * rows * N * K;
    const double bytes = 2.0 * ((double)active * N * K + (double)rows * K + (double)rows * N);
    std::printf("time %-26s E=%-3d N=%-5d K=%-5d rows=%-6d active=%-3d %s%c graph %9.2f us (eager %9.2f us)  %7.1f TFLOP/s  %5.2f TB/s\n",
                name, E, N, K, rows, active, kConfigNames[cfg], kConfigs[cfg] == auto_config ? '*' : ' ', t * 1e6,
                ms_eager * 1e3 / iters, flops / t / 1e12, bytes / t / 1e12);
  }
  CK(cudaEventDestroy(e0)); CK(cudaEventDestroy(e1));
  CK(cudaFree(A)); CK(cudaFree(W)); CK(cudaFree(D)); CK(cudaFree(doff)); CK(cudaFree(ws));
}

int main(int argc, char** argv) {
  const bool do_timing = !(argc > 1 && std::strcmp(argv[1], "--no-timing") == 0);
  int dev = 0;
  CK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s (sm_%d%d, %d SMs)\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
  if (!mc::expert_gemm_sm90_compiled()) {
    std::printf("expert_gemm_sm90 not compiled in (built without sm_90a CUTLASS): FAIL\n");
    return 2;
  }
  if (prop.major != 9 || prop.minor != 0) {
    std::printf("needs an sm_90 GPU: SKIP\n");
    return 77;
  }
  const int sm_count = prop.multiProcessorCount;
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));  // not the default stream
  std::mt19937 rng(1234);

  std::vector<Case> cases;
  cases.push_back({"tiny N=K=256, random", 8, 256, 256, random_counts(8, 200, 0, rng)});
  cases.push_back({"rows=0 total", 4, 256, 256, std::vector<int>(4, 0)});
  cases.push_back({"half the experts empty", 16, 2048, 768, random_counts(16, 700, 2, rng)});
  {
    std::vector<int> one(8, 0);
    one[5] = 1000;
    cases.push_back({"all rows in one expert (5 of 8)", 8, 1536, 2048, one});
  }
  {
    std::vector<int> last(8, 0);
    last[7] = 77;
    cases.push_back({"all rows in the last expert", 8, 256, 256, last});
  }
  cases.push_back({"gpt-oss N=K=2880 (K tail of 128)", 32, 2880, 2880, random_counts(32, 256, 3, rng)});
  cases.push_back({"decode: 8 rows over 128 experts", 128, 1536, 2048, random_counts(128, 8, 0, rng)});
  cases.push_back({"prefill: 4096 rows over 8 experts", 8, 2048, 768, random_counts(8, 4096, 0, rng)});
  cases.push_back({"odd sizes: 1..9 rows per expert", 9, 256, 2880, {1, 2, 3, 4, 5, 6, 7, 8, 9}});

  bool ok = true;
  for (int dt = 0; dt < 2; ++dt) {
    for (size_t i = 0; i < cases.size(); ++i) {
      const bool graph = (i == 2);  // half-empty experts: the routing shuffle moves rows between experts
      if (dt == 0) ok &= run_case<__nv_bfloat16>(cases[i], mc::DType::BF16, sm_count, s, graph, rng);
      else ok &= run_case<__half>(cases[i], mc::DType::FP16, sm_count, s, graph, rng);
    }
  }
  std::printf("correctness: %s\n", ok ? "PASS" : "FAIL");

  if (do_timing) {
    // Benchmark shapes (../shared/README.md), fc1 (N = 2I, K = H) and fc2 (N = H, K = I), bf16.
    time_case<__nv_bfloat16>("qwen3 fc1 T=1 k=8", 128, 1536, 2048, 8, sm_count, s, rng);
    time_case<__nv_bfloat16>("qwen3 fc1 T=64 k=8", 128, 1536, 2048, 512, sm_count, s, rng);
    time_case<__nv_bfloat16>("qwen3 fc1 T=1024 k=8", 128, 1536, 2048, 8192, sm_count, s, rng);
    time_case<__nv_bfloat16>("qwen3 fc1 T=4096 k=8", 128, 1536, 2048, 32768, sm_count, s, rng);
    time_case<__nv_bfloat16>("qwen3 fc2 T=4096 k=8", 128, 2048, 768, 32768, sm_count, s, rng);
    time_case<__nv_bfloat16>("mixtral fc1 T=16 k=2", 8, 28672, 4096, 32, sm_count, s, rng);
    time_case<__nv_bfloat16>("mixtral fc1 T=256 k=2", 8, 28672, 4096, 512, sm_count, s, rng);
    time_case<__nv_bfloat16>("mixtral fc1 T=4096 k=2", 8, 28672, 4096, 8192, sm_count, s, rng);
    time_case<__nv_bfloat16>("gpt-oss fc1 T=64 k=4", 32, 5760, 2880, 256, sm_count, s, rng);
    time_case<__nv_bfloat16>("gpt-oss fc2 T=1024 k=4", 32, 2880, 2880, 4096, sm_count, s, rng);
  }
  CK(cudaStreamDestroy(s));
  return ok ? 0 : 1;
}
