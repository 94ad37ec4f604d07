// What a grid-wide barrier costs on this GPU, against a kernel boundary: the
// measurement docs/design-persistent-decode.md asks for before one
// persistent decode kernel replaces the chain of five.
//
//   barrier_bench [--blocks-per-sm N] [--threads N] [--iters N]
//
// Prints, each the median of --iters timed replays of a CUDA graph:
// - a kernel boundary: a graph of 64 empty kernels (with and without
//   programmatic dependent launch), per kernel;
// - a grid barrier in one resident grid (every SM, N blocks each): 64
//   barriers minus none, per barrier, for an arrive counter with a
//   generation flag (device-scope acquire/release atomics) and for
//   cooperative_groups' grid.sync().
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cuda/atomic>
#include <string>
#include <vector>

namespace {

#define CHECK(x)                                                                   \
  do {                                                                             \
    const cudaError_t e_ = (x);                                                    \
    if (e_ != cudaSuccess) {                                                       \
      std::fprintf(stderr, "barrier_bench: %s: %s\n", #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

constexpr int kChain = 64;  // kernels or barriers per timed graph

// The arrive counter and the generation, in global memory (zero at start).
struct Barrier {
  unsigned count;
  unsigned gen;
};

// Every block arrives; the last one resets the count and bumps the
// generation (release); the others wait for the bump (acquire). Thread 0 of
// a block does the atomics; the block's barriers order its other threads.
__device__ void GridBarrier(Barrier* b, unsigned n_blocks) {
  __syncthreads();
  if (threadIdx.x == 0) {
    cuda::atomic_ref<unsigned, cuda::thread_scope_device> gen(b->gen), count(b->count);
    const unsigned g = gen.load(cuda::memory_order_relaxed);
    if (count.fetch_add(1, cuda::memory_order_acq_rel) == n_blocks - 1) {
      count.store(0, cuda::memory_order_relaxed);
      gen.store(g + 1, cuda::memory_order_release);
    } else {
      while (gen.load(cuda::memory_order_acquire) == g) {
      }
    }
  }
  __syncthreads();
}

__global__ void AtomicBarriers(Barrier* b, int n) {
  for (int i = 0; i < n; ++i) GridBarrier(b, gridDim.x);
}

__global__ void CgBarriers(int n) {
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  for (int i = 0; i < n; ++i) grid.sync();
}

__global__ void Empty() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// Median microseconds of one replay of `graph`.
double TimeGraph(cudaGraphExec_t graph, cudaStream_t s, int iters) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) CHECK(cudaGraphLaunch(graph, s));
  std::vector<double> us;
  for (int i = 0; i < iters; ++i) {
    CHECK(cudaEventRecord(a, s));
    CHECK(cudaGraphLaunch(graph, s));
    CHECK(cudaEventRecord(b, s));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    us.push_back(ms * 1000.0);
  }
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

// Launches `kernel` on s, with the launch attribute `id` (programmatic
// stream serialisation or cooperative) set when `on`.
template <typename... Args>
void LaunchWith(cudaLaunchAttributeID id, bool on, dim3 grid, dim3 block, cudaStream_t s, void (*kernel)(Args...),
                Args... args) {
  cudaLaunchConfig_t c{};
  c.gridDim = grid;
  c.blockDim = block;
  c.stream = s;
  cudaLaunchAttribute attr{};
  attr.id = id;
  if (id == cudaLaunchAttributeCooperative) {
    attr.val.cooperative = 1;
  } else {
    attr.val.programmaticStreamSerializationAllowed = 1;
  }
  c.attrs = &attr;
  c.numAttrs = on ? 1 : 0;
  CHECK(cudaLaunchKernelEx(&c, kernel, args...));
}

template <typename Launch>
double TimeCaptured(cudaStream_t s, int iters, Launch&& launch) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  launch();
  CHECK(cudaStreamEndCapture(s, &g));
  CHECK(cudaGraphInstantiate(&ge, g, 0));
  const double us = TimeGraph(ge, s, iters);
  CHECK(cudaGraphExecDestroy(ge));
  CHECK(cudaGraphDestroy(g));
  return us;
}

int Arg(int argc, char** argv, const char* name, int def) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], name) == 0) return std::atoi(argv[i + 1]);
  }
  return def;
}

}  // namespace

int main(int argc, char** argv) {
  const int per_sm = Arg(argc, argv, "--blocks-per-sm", 2);
  const int threads = Arg(argc, argv, "--threads", 128);
  const int iters = Arg(argc, argv, "--iters", 200);
  if (per_sm < 1 || threads < 32 || threads > 1024 || iters < 1) {
    std::fprintf(stderr, "usage: barrier_bench [--blocks-per-sm N>=1] [--threads 32..1024] [--iters N>=1]\n");
    return 2;
  }
  int dev = 0, sms = 0, coop = 0;
  if (cudaGetDeviceCount(&dev) != cudaSuccess || dev == 0) {
    std::fprintf(stderr, "barrier_bench: no CUDA device\n");
    return 1;
  }
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, 0));
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  int fit_atomic = 0, fit_cg = 0;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit_atomic, AtomicBarriers, threads, 0));
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit_cg, CgBarriers, threads, 0));
  if (fit_atomic < per_sm || fit_cg < per_sm || !coop) {
    std::fprintf(stderr, "barrier_bench: %d blocks of %d threads per SM are not all resident\n", per_sm, threads);
    return 1;
  }
  const int blocks = sms * per_sm;
  std::printf("device: %s, %d SMs; grid %d blocks (%d per SM) of %d threads; median of %d graph replays\n", prop.name,
              sms, blocks, per_sm, threads, iters);
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  Barrier* b = nullptr;
  CHECK(cudaMalloc(&b, sizeof(Barrier)));
  CHECK(cudaMemset(b, 0, sizeof(Barrier)));

  for (const bool pdl : {false, true}) {
    const double us = TimeCaptured(s, iters, [&] {
      for (int i = 0; i < kChain; ++i) {
        LaunchWith(cudaLaunchAttributeProgrammaticStreamSerialization, pdl && i > 0, dim3(blocks), dim3(threads), s,
                   Empty);
      }
    });
    std::printf("kernel boundary (%d empty kernels, PDL %s): %.2f us per kernel\n", kChain, pdl ? "on" : "off",
                us / kChain);
  }

  auto atomic_run = [&](int n) {
    return TimeCaptured(s, iters, [&] {
      AtomicBarriers<<<blocks, threads, 0, s>>>(b, n);
      CHECK(cudaGetLastError());
    });
  };
  const double a0 = atomic_run(0), a1 = atomic_run(kChain);
  std::printf("grid barrier, arrive counter + generation: %.2f us per barrier (kernel alone %.2f us)\n",
              (a1 - a0) / kChain, a0);

  auto cg_run = [&](int n) {
    return TimeCaptured(s, iters, [&] {
      LaunchWith(cudaLaunchAttributeCooperative, true, dim3(blocks), dim3(threads), s, CgBarriers, n);
    });
  };
  const double c0 = cg_run(0), c1 = cg_run(kChain);
  std::printf("grid barrier, cooperative_groups grid.sync: %.2f us per barrier (kernel alone %.2f us)\n",
              (c1 - c0) / kChain, c0);
  CHECK(cudaFree(b));
  CHECK(cudaStreamDestroy(s));
  return 0;
}
