// GPU engine benchmark on a stored context (run on the GPU machine):
//
//   gpu_bench --db DIR --context NAME [--layer L] [--T 1] [--iters 200] [--device N]
//             [--budgets 0.125] [--batch-contexts a,b,c,...]
//
// Per configuration (our dense kernels; budget flat; budget hierarchical) it
// captures one AttendDevice call (bf16 q / o, token-major, as a serving stack
// holds them) in a CUDA graph and replays it `iters` times between CUDA
// events: the end-to-end time of a layer's attention (query conversion,
// centroid scoring, selection, segment table, attention, merge; launch gaps
// inside the graph included). It prints the bytes the call must read (K and V
// of the attended rows, the centroids scored) and the floor: those bytes over
// the device-to-device copy bandwidth measured in the same run. Also: the
// time from ContextHandle::Open (resident) to the first answer against the
// bytes loaded over the host-to-device rate measured in the same run, and
// with --batch-contexts, a batch of decode requests on different contexts in
// one graph. One JSON object per line on stdout.
#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "sqz/db.h"
#include "sqz/query.h"
#include "util/half.h"

namespace {

using Clock = std::chrono::steady_clock;

#define CK(x)                                                                                 \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

void Die(const sqz::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

struct Args {
  std::string db, context, batch;
  int layer = 0, T = 1, iters = 200, device = 0;
  std::vector<double> budgets = {0.125};
};

Args Parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--db")
      a.db = v;
    else if (k == "--context")
      a.context = v;
    else if (k == "--layer")
      a.layer = std::stoi(v);
    else if (k == "--T")
      a.T = std::stoi(v);
    else if (k == "--iters")
      a.iters = std::stoi(v);
    else if (k == "--device")
      a.device = std::stoi(v);
    else if (k == "--batch-contexts")
      a.batch = v;
    else if (k == "--budgets") {
      a.budgets.clear();
      std::stringstream ss(v);
      std::string x;
      while (std::getline(ss, x, ',')) a.budgets.push_back(std::stod(x));
    } else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      std::exit(2);
    }
  }
  if (a.db.empty() || a.context.empty()) {
    std::fprintf(stderr, "usage: gpu_bench --db DIR --context NAME [options]\n");
    std::exit(2);
  }
  return a;
}

// Device-to-device copy bandwidth (bytes read + written per second) and the
// host-to-device rate of pageable memory (how Open uploads).
void MeasureBandwidth(double* d2d, double* h2d) {
  const size_t n = size_t{1} << 30;
  void *a, *b;
  CK(cudaMalloc(&a, n));
  CK(cudaMalloc(&b, n));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice));
  CK(cudaEventRecord(e0));
  for (int i = 0; i < 10; ++i) CK(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice));
  CK(cudaEventRecord(e1));
  CK(cudaEventSynchronize(e1));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, e0, e1));
  *d2d = 2.0 * n * 10 / (ms * 1e-3);
  std::vector<uint8_t> host(size_t{256} << 20, 1);
  auto t0 = Clock::now();
  CK(cudaMemcpy(a, host.data(), host.size(), cudaMemcpyHostToDevice));
  *h2d = host.size() / std::chrono::duration<double>(Clock::now() - t0).count();
  cudaFree(a);
  cudaFree(b);
}

// Queries near stored keys (a key of the head plus noise), fp32 [heads, T, d].
std::vector<float> MakeQueries(const sqz::ContextHandle& h, int layer, int T, std::mt19937_64* rng) {
  const sqz::ContextInfo& info = h.info();
  const int d = info.head_dim, G = info.group_size(), nq = info.n_q_heads;
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> q(static_cast<size_t>(nq) * T * d), k(d), v(d);
  for (int qh = 0; qh < nq; ++qh) {
    for (int t = 0; t < T; ++t) {
      const int64_t row = std::uniform_int_distribution<int64_t>(0, info.n_tokens - 1)(*rng);
      Die(h.ReadRows(layer, qh / G, row, 1, k.data(), v.data()), "ReadRows");
      for (int e = 0; e < d; ++e) q[(static_cast<size_t>(qh) * T + t) * d + e] = 2.f * k[e] + 0.5f * normal(*rng);
    }
  }
  return q;
}

// One request's device buffers: bf16 q / o token-major, lse, workspace.
struct Request {
  const sqz::ContextHandle* h = nullptr;
  sqz::QueryOptions qo;
  void *q = nullptr, *o = nullptr, *ws = nullptr;
  float* lse = nullptr;
  size_t ws_bytes = 0;
  int T = 1, layer = 0;

  void Init(const sqz::ContextHandle* handle, int lay, int t, const std::vector<float>& qh,
            const sqz::QueryOptions& o_) {
    h = handle;
    layer = lay;
    T = t;
    qo = o_;
    const int heads = h->n_served_q_heads(), d = h->info().head_dim;
    std::vector<uint16_t> qb(qh.size());
    for (int i = 0; i < heads; ++i)
      for (int j = 0; j < T; ++j)
        for (int e = 0; e < d; ++e)
          qb[(static_cast<size_t>(j) * heads + i) * d + e] =
              sqz::FloatToBf16(qh[(static_cast<size_t>(i) * T + j) * d + e]);
    Die(h->DeviceWorkspaceBytes(T, qo, &ws_bytes), "DeviceWorkspaceBytes");
    CK(cudaMalloc(&q, qb.size() * 2));
    CK(cudaMalloc(&o, qb.size() * 2));
    CK(cudaMalloc(reinterpret_cast<void**>(&lse), static_cast<size_t>(heads) * T * 4));
    CK(cudaMalloc(&ws, ws_bytes));
    CK(cudaMemcpy(q, qb.data(), qb.size() * 2, cudaMemcpyHostToDevice));
  }
  ~Request() {
    cudaFree(q);
    cudaFree(o);
    cudaFree(lse);
    cudaFree(ws);
  }
  sqz::DeviceBatchItem Item() const {
    sqz::DeviceBatchItem it;
    it.handle = h;
    it.options = qo;
    it.args.layer = layer;
    it.args.T = T;
    it.args.q = q;
    it.args.o = o;
    it.args.lse = lse;
    it.args.dtype = sqz::DType::kBF16;
    it.args.layout = sqz::TensorLayout::kTokenMajor;
    it.args.workspace = ws;
    it.args.workspace_bytes = ws_bytes;
    return it;
  }
};

// Microseconds per replay of a graph holding the batch's calls.
double TimeGraph(const std::vector<sqz::DeviceBatchItem>& items, int iters) {
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  Die(sqz::AttendDeviceBatch(items, s), "AttendDeviceBatch");
  CK(cudaStreamEndCapture(s, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  for (int i = 0; i < 10; ++i) CK(cudaGraphLaunch(ge, s));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaEventRecord(e0, s));
  for (int i = 0; i < iters; ++i) CK(cudaGraphLaunch(ge, s));
  CK(cudaEventRecord(e1, s));
  CK(cudaEventSynchronize(e1));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, e0, e1));
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  cudaStreamDestroy(s);
  return ms * 1e3 / iters;
}

// Matrix-product FLOPs of one call with T queries: attention 4 * d per
// (query row, attended row); with T * G > 64 (prefill: two scoring passes
// on tensor cores) 2 * 2 * d per centroid dot product.
double CallFlops(const sqz::ContextHandle& h, const sqz::AttendStats& st, int T) {
  const sqz::ContextInfo& info = h.info();
  const int G = info.group_size(), d = info.head_dim;
  double f = 0;
  for (const sqz::HeadStats& hs : st.heads) {
    f += 4.0 * d * G * T * static_cast<double>(hs.keys_selected + info.n_always());
    if (G * T > 64) f += 4.0 * d * T * static_cast<double>(hs.clusters_scored);
  }
  return f;
}

// Bytes one call must read: K and V of the attended rows (stored dtype) and
// the fp32 centroids scored.
double CallBytes(const sqz::ContextHandle& h, const sqz::AttendStats& st) {
  const sqz::ContextInfo& info = h.info();
  const double row = 2.0 * info.head_dim * sqz::DTypeSize(info.dtype);
  double b = 0;
  for (const sqz::HeadStats& hs : st.heads) {
    b += (hs.keys_selected + info.n_always()) * row;
    b += static_cast<double>(hs.clusters_scored) / info.group_size() * info.head_dim * 4;
  }
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = Parse(argc, argv);
  CK(cudaSetDevice(a.device));
  double d2d = 0, h2d = 0;
  MeasureBandwidth(&d2d, &h2d);
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, a.device));
  std::printf("{\"device\": \"%s\", \"d2d_copy_GBps\": %.1f, \"h2d_pageable_GBps\": %.2f}\n", prop.name, d2d / 1e9,
              h2d / 1e9);

  sqz::Options dbo;
  dbo.read_only = true;
  std::unique_ptr<sqz::DB> db;
  Die(sqz::DB::Open(dbo, a.db, &db), "DB::Open");
  sqz::OpenOptions oo;
  oo.device = sqz::Device::kCuda;
  oo.device_id = a.device;

  // Time to first answer: Open (index + every page to the GPU) + one call.
  auto t0 = Clock::now();
  std::unique_ptr<sqz::ContextHandle> h;
  Die(sqz::ContextHandle::Open(db.get(), a.context, oo, &h), "Open");
  const double open_s = std::chrono::duration<double>(Clock::now() - t0).count();
  const sqz::ContextInfo& info = h->info();
  std::mt19937_64 rng(42);
  const std::vector<float> q = MakeQueries(*h, a.layer, a.T, &rng);
  std::vector<float> o(q.size()), lse(static_cast<size_t>(info.n_q_heads) * a.T);
  Die(h->Attend(a.layer, q.data(), a.T, sqz::QueryOptions(), o.data(), lse.data()), "Attend");
  const double first_s = std::chrono::duration<double>(Clock::now() - t0).count();
  const double kv_bytes =
      static_cast<double>(info.n_layers) * info.n_kv_heads * info.pages_per_head() * info.page_bytes();
  std::printf(
      "{\"what\": \"time_to_first_answer\", \"context\": \"%s\", \"tokens\": %lld, \"layers\": %d, \"open_s\": %.4f, "
      "\"first_answer_s\": %.4f, \"kv_page_bytes\": %.0f, \"floor_s\": %.4f}\n",
      info.name.c_str(), static_cast<long long>(info.n_tokens), info.n_layers, open_s, first_s, kv_bytes,
      kv_bytes / h2d);

  struct Cfg {
    std::string name;
    sqz::QueryOptions qo;
  };
  std::vector<Cfg> cfgs;
  {
    Cfg c{"dense", {}};
    c.qo.mode = sqz::SelectionMode::kDense;
    cfgs.push_back(c);
  }
  for (double b : a.budgets) {
    Cfg f{"budget " + std::to_string(b).substr(0, 6) + " flat", {}};
    f.qo.budget = b;
    cfgs.push_back(f);
    Cfg hi{"budget " + std::to_string(b).substr(0, 6) + " hier", {}};
    hi.qo.budget = b;
    hi.qo.hierarchical = true;
    cfgs.push_back(hi);
  }
  double dense_us = 0;
  for (const Cfg& c : cfgs) {
    sqz::AttendStats st;
    Die(h->Attend(a.layer, q.data(), a.T, c.qo, o.data(), lse.data(), &st), "Attend");
    Request r;
    r.Init(h.get(), a.layer, a.T, q, c.qo);
    const double us = TimeGraph({r.Item()}, a.iters);
    if (c.name == "dense") dense_us = us;
    const double bytes = CallBytes(*h, st), flops = CallFlops(*h, st, a.T);
    std::printf(
        "{\"what\": \"layer_call\", \"config\": \"%s\", \"tokens\": %lld, \"T\": %d, \"us\": %.2f, \"bytes\": %.0f, "
        "\"floor_us\": %.2f, \"GBps\": %.1f, \"flops\": %.4g, \"TFLOPs\": %.1f, \"vs_our_dense\": %.2f, "
        "\"keys_selected\": %lld, \"workspace\": %zu}\n",
        c.name.c_str(), static_cast<long long>(info.n_tokens), a.T, us, bytes, bytes / d2d * 1e6,
        bytes / (us * 1e-6) / 1e9, flops, flops / (us * 1e-6) / 1e12, dense_us / us,
        static_cast<long long>(st.keys_selected()), r.ws_bytes);
  }

  if (!a.batch.empty()) {
    // A batch of decode requests on different contexts, one graph.
    std::vector<std::unique_ptr<sqz::ContextHandle>> hs;
    std::stringstream ss(a.batch);
    std::string name;
    while (std::getline(ss, name, ',')) {
      hs.emplace_back();
      Die(sqz::ContextHandle::Open(db.get(), name, oo, &hs.back()), "Open (batch)");
    }
    for (double b : a.budgets) {
      sqz::QueryOptions qo;
      qo.budget = b;
      std::vector<std::unique_ptr<Request>> reqs;
      std::vector<sqz::DeviceBatchItem> items;
      double bytes = 0;
      for (auto& hh : hs) {
        const std::vector<float> qq = MakeQueries(*hh, a.layer, 1, &rng);
        std::vector<float> oo2(qq.size()), ll(static_cast<size_t>(hh->info().n_q_heads));
        sqz::AttendStats st;
        Die(hh->Attend(a.layer, qq.data(), 1, qo, oo2.data(), ll.data(), &st), "Attend (batch)");
        bytes += CallBytes(*hh, st);
        reqs.push_back(std::make_unique<Request>());
        reqs.back()->Init(hh.get(), a.layer, 1, qq, qo);
        items.push_back(reqs.back()->Item());
      }
      const double us = TimeGraph(items, a.iters);
      std::printf(
          "{\"what\": \"batch\", \"requests\": %zu, \"budget\": %.4f, \"us\": %.2f, \"bytes\": %.0f, \"GBps\": %.1f, "
          "\"of_copy_bw\": %.3f}\n",
          items.size(), b, us, bytes, bytes / (us * 1e-6) / 1e9, bytes / (us * 1e-6) / d2d);
    }
  }
  return 0;
}
