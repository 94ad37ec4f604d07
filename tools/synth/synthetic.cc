// Synthetic KV corpora (see synthetic.h for the structure).
//
// Model of one (layer, KV head), head dimension d, scale 1/sqrt(d):
//   key t      = a * m_topic * (1 + 0.1 z) * c_topic(t) + sigma * z_d + outliers
//   sink key 0 = A * s + sigma * z_d + outliers
//   value      = z_d
// where c_j are random unit topic directions, s a random unit "sink"
// direction, and the outliers a few channels with large offsets shared by all
// keys (a constant shift of every logit: softmax ignores it, but it dominates
// key norms as in real models and so stresses spherical clustering).
//
// Query head h (KV head h / G):
//   concentrated: q = sum over 1-3 target topics j of (delta_j sqrt(d) / (a m_j)) c_j
//                     + gamma s + small noise
//     so a key of target topic j scores about delta_j (7 to 10) and the other
//     keys about 0 +- 1: the softmax mass lands on the target topics' tokens.
//     Targets come from a small per-head pool of topics present in the
//     context, so window queries predict the fresh ones (as calibration
//     assumes) without being identical to them.
//   spread: q = eps * z_d + gamma s, eps giving logits of standard deviation
//     0.3 to 0.7 over the keys (near-uniform attention).
//   Both kinds have no other component along s, so gamma alone sets the
//   sink's logit: 0.5 to 2 below the log of the other keys' total weight,
//   giving the sink a noticeable share of the mass (a few % to ~40%)
//   whatever the context length.
//
// Randomness: a fixed generator (splitmix64 seeding xoshiro256**, Marsaglia's
// polar method for normals), never <random>'s distributions, whose output is
// implementation-defined. Every stream is keyed by (seed, purpose, layer,
// head), so results do not depend on the thread schedule, and changing one
// count (e.g. n_queries) does not perturb the other tensors.

#include "synth/synthetic.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "util/half.h"
#include "util/safetensors.h"

namespace sqz::synth {

namespace {

// ---------------------------------------------------------------------------
// Random numbers
// ---------------------------------------------------------------------------

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Purposes of the independent streams (values are part of the generator's
// output: changing one changes every corpus).
enum Purpose : uint64_t {
  kSegments = 1,
  kKinds = 2,
  kKvHeadParams = 3,
  kKeys = 4,
  kValues = 5,
  kQHeadParams = 6,
  kWindowQueries = 7,
  kFreshQueries = 8,
};

uint64_t StreamKey(uint64_t seed, uint64_t purpose, uint64_t layer = 0, uint64_t head = 0) {
  uint64_t s = seed;
  uint64_t k = SplitMix64(&s);
  for (uint64_t part : {purpose, layer, head}) {
    s = k ^ (part * 0xD1342543DE82EF95ull + 0x632BE59BD9B4E019ull);
    k = SplitMix64(&s);
  }
  return k;
}

// xoshiro256** (Blackman and Vigna), seeded through splitmix64.
class Rng {
 public:
  explicit Rng(uint64_t key) {
    for (uint64_t& w : s_) w = SplitMix64(&key);
  }

  uint64_t Next() {
    const uint64_t result = Rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = Rotl(s_[3], 45);
    return result;
  }

  // Uniform in [0, 1) with 53 random bits.
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }
  double Uniform(double lo, double hi) { return lo + (hi - lo) * Uniform(); }
  // Uniform integer in [0, n) for 0 < n < 2^53 (bias below n / 2^53).
  uint64_t Below(uint64_t n) { return std::min(n - 1, static_cast<uint64_t>(Uniform() * static_cast<double>(n))); }

  // Standard normal (Marsaglia's polar method; the second value of each pair
  // is kept for the next call).
  double Normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u, v, r;
    do {
      u = 2.0 * Uniform() - 1.0;
      v = 2.0 * Uniform() - 1.0;
      r = u * u + v * v;
    } while (r >= 1.0 || r == 0.0);
    const double f = std::sqrt(-2.0 * std::log(r) / r);
    spare_ = v * f;
    has_spare_ = true;
    return u * f;
  }

  // dst[i] = scale * N(0, 1) for n floats. The bulk of the generator's time
  // is here, so it works in pairs and in float where precision allows.
  void FillNormal(float* dst, size_t n, float scale) {
    size_t i = 0;
    if (has_spare_ && n > 0) dst[i++] = scale * static_cast<float>(Normal());
    for (; i + 2 <= n; i += 2) {
      float u, v, r;
      do {
        u = static_cast<float>(Next() >> 40) * 0x1.0p-23f - 1.0f;
        v = static_cast<float>(Next() >> 40) * 0x1.0p-23f - 1.0f;
        r = u * u + v * v;
      } while (r >= 1.0f || r == 0.0f);
      const float f = scale * std::sqrt(-2.0f * std::log(r) / r);
      dst[i] = u * f;
      dst[i + 1] = v * f;
    }
    if (i < n) dst[i] = scale * static_cast<float>(Normal());
  }

 private:
  static uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
  bool has_spare_ = false;
  double spare_ = 0;
};

// ---------------------------------------------------------------------------
// Model constants (documented in the file comment)
// ---------------------------------------------------------------------------

constexpr double kTopicScale = 0.7;   // a = kTopicScale * sqrt(d)
constexpr double kNoiseStd = 0.5;     // sigma, per channel
constexpr double kSinkScale = 2.5;    // A = kSinkScale * a
constexpr double kOutlierVar = 0.05;  // relative per-token jitter of outlier offsets
constexpr int64_t kMinRun = 32;       // topic run lengths, log-uniform in [kMinRun, kMaxRun]
constexpr int64_t kMaxRun = 512;

void Unit(std::vector<double>* x) {
  double n = 0;
  for (double e : *x) n += e * e;
  n = std::sqrt(n);
  for (double& e : *x) e /= n;
}

std::vector<double> RandomUnit(Rng* rng, int d) {
  std::vector<double> x(d);
  for (double& e : x) e = rng->Normal();
  Unit(&x);
  return x;
}

// Topic of every token (token 0, the sink, has none: -1), in contiguous runs
// of log-uniform length; consecutive runs differ. Shared by all layers and
// heads of a context, like the paragraphs of a document.
std::vector<int> Segments(const Spec& spec) {
  Rng rng(StreamKey(spec.seed, kSegments));
  std::vector<int> topic(spec.n_tokens, -1);
  int64_t t = 1;
  int prev = -1;
  while (t < spec.n_tokens) {
    const double len = std::exp(rng.Uniform(std::log(double(kMinRun)), std::log(double(kMaxRun) + 1)));
    const int64_t end = std::min<int64_t>(spec.n_tokens, t + static_cast<int64_t>(len));
    int j = static_cast<int>(rng.Below(spec.n_topics));
    if (j == prev && spec.n_topics > 1) j = (j + 1 + static_cast<int>(rng.Below(spec.n_topics - 1))) % spec.n_topics;
    std::fill(topic.begin() + t, topic.begin() + end, j);
    prev = j;
    t = end;
  }
  return topic;
}

// Per (layer, KV head) parameters that both keys and queries depend on.
struct KvHeadParams {
  std::vector<std::vector<double>> centers;  // n_topics unit vectors
  std::vector<double> magnitude;             // m_j per topic
  std::vector<double> sink_dir;              // s (unit)
  std::vector<int> outlier_channels;
  std::vector<double> outlier_offsets;
};

KvHeadParams MakeKvHeadParams(const Spec& spec, int layer, int kv_head) {
  Rng rng(StreamKey(spec.seed, kKvHeadParams, layer, kv_head));
  const int d = spec.head_dim;
  const double a = kTopicScale * std::sqrt(double(d));
  KvHeadParams p;
  p.centers.reserve(spec.n_topics);
  for (int j = 0; j < spec.n_topics; ++j) p.centers.push_back(RandomUnit(&rng, d));
  p.magnitude.resize(spec.n_topics);
  for (double& m : p.magnitude) m = rng.Uniform(0.7, 1.3);
  p.sink_dir = RandomUnit(&rng, d);
  // 2 to 4 distinct channels (fewer if d is tiny), offsets of 2a to 4a.
  const int n_out = std::min(d, 2 + static_cast<int>(rng.Below(3)));
  std::vector<int> channels(d);
  for (int i = 0; i < d; ++i) channels[i] = i;
  for (int i = 0; i < n_out; ++i) {
    std::swap(channels[i], channels[i + rng.Below(d - i)]);
    p.outlier_channels.push_back(channels[i]);
    const double sign = rng.Uniform() < 0.5 ? -1.0 : 1.0;
    p.outlier_offsets.push_back(sign * rng.Uniform(2.0, 4.0) * a);
  }
  return p;
}

void GenerateKeys(const Spec& spec, int layer, int kv_head, const KvHeadParams& p, const std::vector<int>& topic,
                  float* out) {
  Rng rng(StreamKey(spec.seed, kKeys, layer, kv_head));
  const int d = spec.head_dim;
  const double a = kTopicScale * std::sqrt(double(d));
  // Float copies of the directions for the inner loop.
  std::vector<float> centers(static_cast<size_t>(spec.n_topics) * d);
  for (int j = 0; j < spec.n_topics; ++j) {
    for (int i = 0; i < d; ++i) centers[size_t(j) * d + i] = static_cast<float>(p.centers[j][i]);
  }
  const std::vector<float> sink(p.sink_dir.begin(), p.sink_dir.end());
  for (int64_t t = 0; t < spec.n_tokens; ++t) {
    float* k = out + t * d;
    rng.FillNormal(k, d, static_cast<float>(kNoiseStd));
    const float* dir;
    float mag;
    if (t == 0) {
      dir = sink.data();
      mag = static_cast<float>(kSinkScale * a);
    } else {
      const int j = topic[t];
      dir = centers.data() + size_t(j) * d;
      mag = static_cast<float>(a * p.magnitude[j] * (1.0 + 0.1 * rng.Normal()));
    }
    for (int i = 0; i < d; ++i) k[i] += mag * dir[i];
    for (size_t c = 0; c < p.outlier_channels.size(); ++c) {
      k[p.outlier_channels[c]] += static_cast<float>(p.outlier_offsets[c] * (1.0 + kOutlierVar * rng.Normal()));
    }
  }
}

// Per query head parameters.
struct QHeadParams {
  HeadKind kind;
  std::vector<int> pool;  // concentrated: candidate target topics
  double sink_logit;      // target logit of the sink key
  double spread_std;      // spread: logit standard deviation over the keys
};

QHeadParams MakeQHeadParams(const Spec& spec, int layer, int q_head, const std::vector<int>& topic) {
  Rng rng(StreamKey(spec.seed, kQHeadParams, layer, q_head));
  QHeadParams p;
  p.kind = KindOf(spec, layer, q_head);
  // The pool holds topics of random tokens, so queries target content that
  // the context actually contains.
  const int pool_size = std::max(3, spec.n_topics / 8);
  for (int i = 0; i < pool_size && spec.n_tokens > 1; ++i) {
    const int j = topic[1 + rng.Below(spec.n_tokens - 1)];
    if (std::find(p.pool.begin(), p.pool.end(), j) == p.pool.end()) p.pool.push_back(j);
  }
  // The sink's logit sits 0.5 to 2 below the log of the other keys' total
  // weight, so it takes a noticeable share whatever the context length.
  // Concentrated: that weight is about (tokens of a target topic) *
  // e^delta(~9.25); spread: about n_tokens (logits near 0), and the sink sits
  // a further 0.5 lower.
  const double rel = rng.Uniform(-2.0, -0.5);
  if (p.kind == HeadKind::kConcentrated && !p.pool.empty()) {
    std::vector<char> in_pool(spec.n_topics, 0);
    for (int j : p.pool) in_pool[j] = 1;
    int64_t pool_tokens = 0;
    for (int t : topic) pool_tokens += t >= 0 && in_pool[t];
    const double per_topic = std::max(1.0, double(pool_tokens) / p.pool.size());
    p.sink_logit = std::log(per_topic) + 9.25 + rel;
  } else {
    p.sink_logit = std::log(double(spec.n_tokens)) + rel - 0.5;
  }
  p.spread_std = rng.Uniform(0.3, 0.7);
  return p;
}

// One query vector of head `qp` into q[0, d).
void MakeQuery(const Spec& spec, const KvHeadParams& kp, const QHeadParams& qp, Rng* rng, float* q) {
  const int d = spec.head_dim;
  const double sqrt_d = std::sqrt(double(d));
  const double a = kTopicScale * sqrt_d;
  std::vector<double> x(d, 0.0);
  if (qp.kind == HeadKind::kConcentrated && !qp.pool.empty()) {
    // 1, 2 or 3 targets (probabilities 0.5, 0.3, 0.2); the first is the
    // strongest, so even multi-topic queries are dominated by few clusters.
    const double u = rng->Uniform();
    const int n_targets = std::min<int>(static_cast<int>(qp.pool.size()), u < 0.5 ? 1 : (u < 0.8 ? 2 : 3));
    std::vector<int> chosen;
    while (static_cast<int>(chosen.size()) < n_targets) {
      const int j = qp.pool[rng->Below(qp.pool.size())];
      if (std::find(chosen.begin(), chosen.end(), j) == chosen.end()) chosen.push_back(j);
    }
    for (size_t c = 0; c < chosen.size(); ++c) {
      const int j = chosen[c];
      const double delta = c == 0 ? rng->Uniform(8.5, 10.0) : rng->Uniform(7.0, 9.0);
      const double coef = delta * sqrt_d / (a * kp.magnitude[j]);
      for (int i = 0; i < d; ++i) x[i] += coef * kp.centers[j][i];
    }
    for (int i = 0; i < d; ++i) x[i] += 0.05 * rng->Normal();
  } else {
    // Logit std over keys ~ eps * sqrt(a^2 m^2 / d + sigma^2) for q ~ eps N(0, I).
    const double eps = qp.spread_std / std::sqrt(kTopicScale * kTopicScale + kNoiseStd * kNoiseStd);
    for (int i = 0; i < d; ++i) x[i] = eps * rng->Normal();
  }
  // Without its component along s, the topic/noise part cannot move the
  // sink's logit (a random part would swing it by several units); the sink
  // component then sets it: logit of the sink key = gamma * A / sqrt(d).
  double along = 0;
  for (int i = 0; i < d; ++i) along += x[i] * kp.sink_dir[i];
  for (int i = 0; i < d; ++i) x[i] -= along * kp.sink_dir[i];
  const double gamma = qp.sink_logit * sqrt_d / (kSinkScale * a) * (1.0 + 0.05 * rng->Normal());
  for (int i = 0; i < d; ++i) q[i] = static_cast<float>(x[i] + gamma * kp.sink_dir[i]);
}

// Runs fn(0..n-1) on up to hardware_concurrency threads. Every task writes
// disjoint output and owns its random stream, so the result is schedule-free.
template <typename Fn>
void ParallelFor(int n, Fn fn) {
  const int n_threads = std::max(1, std::min<int>(n, static_cast<int>(std::thread::hardware_concurrency())));
  if (n_threads <= 1) {
    for (int i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int> next{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < n_threads; ++t) {
    threads.emplace_back([&] {
      for (int i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
    });
  }
  for (std::thread& th : threads) th.join();
}

Status ValidateSpec(const Spec& s) {
  if (s.n_layers <= 0 || s.n_kv_heads <= 0 || s.n_q_heads <= 0 || s.n_tokens <= 0 || s.head_dim <= 0 ||
      s.n_topics <= 0 || s.q_window < 0 || s.n_queries < 0) {
    return Status::InvalidArgument("synthetic spec: counts must be positive (q_window, n_queries >= 0)");
  }
  if (s.n_q_heads % s.n_kv_heads != 0) {
    return Status::InvalidArgument("synthetic spec: n_q_heads " + std::to_string(s.n_q_heads) +
                                   " is not a multiple of n_kv_heads " + std::to_string(s.n_kv_heads));
  }
  if (!(s.concentrated_fraction >= 0.0 && s.concentrated_fraction <= 1.0)) {
    return Status::InvalidArgument("synthetic spec: concentrated_fraction must be in [0, 1]");
  }
  return Status::OK();
}

std::string HeadKinds(const Spec& spec) {
  std::string kinds;
  kinds.reserve(static_cast<size_t>(spec.n_layers) * spec.n_q_heads);
  for (int l = 0; l < spec.n_layers; ++l) {
    for (int h = 0; h < spec.n_q_heads; ++h) kinds += KindOf(spec, l, h) == HeadKind::kConcentrated ? 'C' : 'S';
  }
  return kinds;
}

void AddTensor(SafetensorsWriter* w, const std::string& name, DType dtype, std::vector<int64_t> shape,
               const std::vector<float>& data, std::vector<uint8_t>* scratch) {
  if (dtype == DType::kF32) {
    w->Add(name, dtype, std::move(shape), data.data());
    return;
  }
  scratch->resize(data.size() * DTypeSize(dtype));
  ConvertFromFloat(data.data(), data.size(), dtype, scratch->data());
  w->Add(name, dtype, std::move(shape), scratch->data());
}

}  // namespace

const char* HeadKindName(HeadKind k) {
  switch (k) {
    case HeadKind::kConcentrated:
      return "concentrated";
    case HeadKind::kSpread:
      return "spread";
  }
  return "?";
}

HeadKind KindOf(const Spec& spec, int layer, int q_head) {
  // Exactly round(fraction * n_q_heads) concentrated heads per layer, at
  // positions given by a seeded shuffle, so every layer has both kinds.
  const int h = spec.n_q_heads;
  const int n_conc = std::clamp(static_cast<int>(std::lround(spec.concentrated_fraction * h)), 0, h);
  std::vector<int> order(h);
  for (int i = 0; i < h; ++i) order[i] = i;
  Rng rng(StreamKey(spec.seed, kKinds, layer));
  for (int i = h - 1; i > 0; --i) std::swap(order[i], order[rng.Below(i + 1)]);
  for (int i = 0; i < n_conc; ++i) {
    if (order[i] == q_head) return HeadKind::kConcentrated;
  }
  return HeadKind::kSpread;
}

void GenerateLayer(const Spec& spec, int layer, Layer* out) {
  // The public entry points that can report errors validate first; here an
  // invalid spec (which would index out of bounds) yields empty tensors.
  if (!ValidateSpec(spec).ok()) {
    *out = Layer();
    return;
  }
  const int d = spec.head_dim;
  const int64_t n = spec.n_tokens;
  const int group = spec.n_q_heads / spec.n_kv_heads;
  const size_t head_elems = static_cast<size_t>(n) * d;
  const std::vector<int> topic = Segments(spec);

  out->k.assign(head_elems * spec.n_kv_heads, 0.0f);
  out->v.assign(head_elems * spec.n_kv_heads, 0.0f);
  out->q_window.assign(static_cast<size_t>(spec.n_q_heads) * spec.q_window * d, 0.0f);
  out->queries.assign(static_cast<size_t>(spec.n_q_heads) * spec.n_queries * d, 0.0f);

  // Tasks 0..H-1: keys and queries of KV head g; H..2H-1: values of KV head g.
  ParallelFor(2 * spec.n_kv_heads, [&](int task) {
    const int g = task % spec.n_kv_heads;
    if (task >= spec.n_kv_heads) {
      Rng rng(StreamKey(spec.seed, kValues, layer, g));
      rng.FillNormal(out->v.data() + g * head_elems, head_elems, 1.0f);
      return;
    }
    const KvHeadParams kp = MakeKvHeadParams(spec, layer, g);
    GenerateKeys(spec, layer, g, kp, topic, out->k.data() + g * head_elems);
    for (int h = g * group; h < (g + 1) * group; ++h) {
      const QHeadParams qp = MakeQHeadParams(spec, layer, h, topic);
      Rng wrng(StreamKey(spec.seed, kWindowQueries, layer, h));
      for (int i = 0; i < spec.q_window; ++i) {
        MakeQuery(spec, kp, qp, &wrng, out->q_window.data() + (static_cast<size_t>(h) * spec.q_window + i) * d);
      }
      Rng qrng(StreamKey(spec.seed, kFreshQueries, layer, h));
      for (int i = 0; i < spec.n_queries; ++i) {
        MakeQuery(spec, kp, qp, &qrng, out->queries.data() + (static_cast<size_t>(h) * spec.n_queries + i) * d);
      }
    }
  });
}

Status WriteContextFiles(const Spec& spec, const std::string& kv_path, const std::string& queries_path) {
  SQZ_RETURN_IF_ERROR(ValidateSpec(spec));
  if (kv_path.empty() && queries_path.empty()) return Status::OK();

  SafetensorsWriter kv, qf;
  const std::string kinds = HeadKinds(spec);
  for (SafetensorsWriter* w : {&kv, &qf}) {
    w->SetMetadata("n_q_heads", std::to_string(spec.n_q_heads));
    w->SetMetadata("model", "synthetic");
    w->SetMetadata("synthetic", "true");
    w->SetMetadata("seed", std::to_string(spec.seed));
    w->SetMetadata("head_kinds", kinds);
  }

  const int64_t d = spec.head_dim;
  Layer layer;
  std::vector<uint8_t> scratch;
  for (int l = 0; l < spec.n_layers; ++l) {
    GenerateLayer(spec, l, &layer);
    const std::string prefix = "layers." + std::to_string(l) + ".";
    if (!kv_path.empty()) {
      AddTensor(&kv, prefix + "k", spec.dtype, {spec.n_kv_heads, spec.n_tokens, d}, layer.k, &scratch);
      AddTensor(&kv, prefix + "v", spec.dtype, {spec.n_kv_heads, spec.n_tokens, d}, layer.v, &scratch);
      if (spec.q_window > 0) {
        AddTensor(&kv, prefix + "q_window", spec.dtype, {spec.n_q_heads, spec.q_window, d}, layer.q_window, &scratch);
      }
    }
    if (!queries_path.empty()) {
      AddTensor(&qf, prefix + "q", spec.dtype, {spec.n_q_heads, spec.n_queries, d}, layer.queries, &scratch);
    }
  }
  if (!kv_path.empty()) SQZ_RETURN_IF_ERROR(kv.WriteFile(kv_path));
  if (!queries_path.empty()) SQZ_RETURN_IF_ERROR(qf.WriteFile(queries_path));
  return Status::OK();
}

Status WriteCorpus(const Spec& spec, int n_contexts, const std::string& dir, std::vector<std::string>* kv_paths) {
  SQZ_RETURN_IF_ERROR(ValidateSpec(spec));
  if (n_contexts < 0) return Status::InvalidArgument("synthetic corpus: negative n_contexts");
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(dir) / "queries", ec);
  if (ec) return Status::IOError("cannot create " + dir + "/queries: " + ec.message());
  if (kv_paths) kv_paths->clear();
  for (int i = 0; i < n_contexts; ++i) {
    char name[32];
    std::snprintf(name, sizeof(name), "ctx_%03d.safetensors", i);
    Spec s = spec;
    s.seed = spec.seed + static_cast<uint64_t>(i);
    const std::string kv = dir + "/" + name;
    SQZ_RETURN_IF_ERROR(WriteContextFiles(s, kv, dir + "/queries/" + name));
    if (kv_paths) kv_paths->push_back(kv);
  }
  return Status::OK();
}

}  // namespace sqz::synth
