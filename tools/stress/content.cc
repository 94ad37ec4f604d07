#include "stress/content.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "sqz/kv_source.h"
#include "stress/oracle.h"
#include "synth/synthetic.h"
#include "util/half.h"

namespace sqz::stress {

namespace {

constexpr int kGroup = kQHeads / kKvHeads;
// Relative error allowed between the engine (float32) and the double
// reference over the same stored values: only the summation order differs.
// Two versions differ by far more (and the row hashes tell them apart
// exactly).
constexpr double kTolerance = 1e-4;

const char* kModelPrefix = "sqz-stress name=";

uint64_t RowHash(const float* k, const float* v) {
  uint64_t h = 0x6a09e667f3bcc909ull;
  for (const float* p : {k, v}) {
    for (int e = 0; e < kHeadDim; e += 2) {
      uint32_t a, b;
      std::memcpy(&a, p + e, 4);
      std::memcpy(&b, p + e + 1, 4);
      h = Mix(h ^ ((static_cast<uint64_t>(a) << 32) | b));
    }
  }
  return h;
}

// The version's data as stored (`bytes`, per layer) and as ReadRows returns
// it (float32, per layer), plus window queries (calibrated versions).
struct VersionData {
  std::vector<std::vector<uint8_t>> k, v;  // per layer: [kKvHeads, n, d] in spec.dtype
  std::vector<std::vector<float>> kf, vf;  // the same values in float32
  std::vector<std::vector<float>> q_window, queries;
};

void Generate(const VersionSpec& spec, VersionData* out) {
  synth::Spec s;
  s.n_layers = kLayers;
  s.n_kv_heads = kKvHeads;
  s.n_q_heads = kQHeads;
  s.head_dim = kHeadDim;
  s.n_tokens = spec.n_tokens;
  s.q_window = spec.calibrated ? 16 : 0;
  s.n_queries = kT;
  s.n_topics = 16;
  s.seed = spec.data_seed;
  for (int l = 0; l < kLayers; ++l) {
    synth::Layer layer;
    synth::GenerateLayer(s, l, &layer);
    const size_t n = layer.k.size();
    std::vector<uint8_t> kb(n * DTypeSize(spec.dtype)), vb(kb.size());
    ConvertFromFloat(layer.k.data(), n, spec.dtype, kb.data());
    ConvertFromFloat(layer.v.data(), n, spec.dtype, vb.data());
    std::vector<float> kf(n), vf(n);
    ConvertToFloat(kb.data(), spec.dtype, n, kf.data());
    ConvertToFloat(vb.data(), spec.dtype, n, vf.data());
    out->k.push_back(std::move(kb));
    out->v.push_back(std::move(vb));
    out->kf.push_back(std::move(kf));
    out->vf.push_back(std::move(vf));
    out->q_window.push_back(std::move(layer.q_window));
    out->queries.push_back(std::move(layer.queries));
  }
}

// Softmax attention of one query row over rows `segs` of (k, v) [rows, d],
// in double. Empty: lse = -inf, o = 0.
void ReferenceAttend(const float* q, const float* k, const float* v, const std::vector<Segment>& segs, double* o,
                     double* lse) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
  std::vector<std::pair<double, int64_t>> x;
  for (const Segment& s : segs) {
    for (uint32_t r = s.first_row; r < s.first_row + s.n_rows; ++r) {
      double dot = 0;
      for (int e = 0; e < kHeadDim; ++e) dot += static_cast<double>(q[e]) * k[static_cast<size_t>(r) * kHeadDim + e];
      x.emplace_back(scale * dot, r);
    }
  }
  std::fill(o, o + kHeadDim, 0.0);
  if (x.empty()) {
    *lse = -INFINITY;
    return;
  }
  double m = -INFINITY;
  for (const auto& [s, r] : x) m = std::max(m, s);
  double z = 0;
  for (const auto& [s, r] : x) z += std::exp(s - m);
  for (const auto& [s, r] : x) {
    const double w = std::exp(s - m) / z;
    for (int e = 0; e < kHeadDim; ++e) o[e] += w * v[static_cast<size_t>(r) * kHeadDim + e];
  }
  *lse = m + std::log(z);
}

// Error of one output row against the reference: relative L2 of o, and
// |lse diff| / max(1, |lse|). Infinity for a non-finite output.
double RowError(const float* o, float lse, const double* ref_o, double ref_lse) {
  if (std::isinf(ref_lse)) {
    double worst = std::isinf(lse) && lse < 0 ? 0 : INFINITY;
    for (int e = 0; e < kHeadDim; ++e) worst = std::max(worst, std::fabs(static_cast<double>(o[e])));
    return worst;
  }
  double diff = 0, norm = 0;
  for (int e = 0; e < kHeadDim; ++e) {
    if (!std::isfinite(o[e])) return INFINITY;
    diff += (o[e] - ref_o[e]) * (o[e] - ref_o[e]);
    norm += ref_o[e] * ref_o[e];
  }
  if (!std::isfinite(lse)) return INFINITY;
  return std::max(std::sqrt(diff / std::max(norm, 1e-300)),
                  std::fabs(lse - ref_lse) / std::max(1.0, std::fabs(ref_lse)));
}

std::string OptionsToString(const QueryOptions& o, int layer, int T) {
  std::string s = o.mode == SelectionMode::kDense    ? "dense"
                  : o.mode == SelectionMode::kBudget ? "budget=" + std::to_string(o.budget)
                                                     : "threshold quantile=" + std::to_string(o.threshold_quantile);
  s += o.hierarchical ? " hierarchical" : " flat";
  s += o.gqa == GqaPolicy::kUnion ? " union" : " per-head";
  s += o.per_query_selection ? " per-query" : " shared";
  return s + " layer " + std::to_string(layer) + " T=" + std::to_string(T);
}

}  // namespace

uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t HashString(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return Mix(h);
}

std::string VersionSpec::Model() const { return kModelPrefix + name + " gen=" + std::to_string(gen); }

bool ParseModel(const std::string& model, std::string* name, uint64_t* gen) {
  const std::string prefix = kModelPrefix;
  if (model.compare(0, prefix.size(), prefix) != 0) return false;
  const size_t g = model.rfind(" gen=");
  if (g == std::string::npos || g < prefix.size()) return false;
  const std::string num = model.substr(g + 5);
  if (num.empty() || num.size() > 19 || num.find_first_not_of("0123456789") != std::string::npos) return false;
  *name = model.substr(prefix.size(), g - prefix.size());
  *gen = std::stoull(num);
  return true;
}

VersionSpec SpecOf(const std::string& name, uint64_t gen) {
  VersionSpec s;
  s.name = name;
  s.gen = gen;
  uint64_t h = Mix(HashString(name) ^ Mix(gen));
  auto next = [&h] { return h = Mix(h); };
  s.n_tokens = 500 + static_cast<int64_t>(next() % 2501);
  const DType dtypes[] = {DType::kF16, DType::kBF16, DType::kF32};
  s.dtype = dtypes[next() % 3];
  const int pages[] = {8, 16, 32};
  s.page_rows = pages[next() % 3];
  const int windows[] = {32, 64, 100};
  s.window = windows[next() % 3];
  s.calibrated = next() % 2 == 0;
  s.read_ahead = next() % 2 == 0;
  s.data_seed = next();
  s.build_seed = next();
  return s;
}

Status BuildVersion(DB* db, const VersionSpec& spec, bool replace,
                    const std::function<void(const BuildProgress&)>& on_progress) {
  VersionData data;
  Generate(spec, &data);
  std::vector<KvLayerView> views;
  const std::vector<int64_t> shape = {kKvHeads, spec.n_tokens, kHeadDim};
  for (int l = 0; l < kLayers; ++l) {
    KvLayerView v;
    v.k = {data.k[l].data(), spec.dtype, shape};
    v.v = {data.v[l].data(), spec.dtype, shape};
    if (spec.calibrated) {
      const int64_t w = static_cast<int64_t>(data.q_window[l].size()) / (kQHeads * kHeadDim);
      v.q_window = {data.q_window[l].data(), DType::kF32, {kQHeads, w, kHeadDim}};
    }
    views.push_back(v);
  }
  std::unique_ptr<KvSource> src;
  SQZ_RETURN_IF_ERROR(MakeInMemoryKvSource(kQHeads, std::move(views), spec.Model(), &src));
  BuildOptions o;
  o.window = spec.window;
  o.n_sinks = kSinks;
  o.page_rows = spec.page_rows;
  o.kmeans_iters = 3;
  o.seed = spec.build_seed;
  o.read_ahead = spec.read_ahead;
  o.replace = replace;
  if (on_progress) o.on_progress = on_progress;
  return BuildContext(db, spec.name, src.get(), o);
}

void ComputeReference(const VersionSpec& spec, Reference* out) {
  VersionData data;
  Generate(spec, &data);
  out->spec = spec;
  const int64_t n = spec.n_tokens;
  const int64_t n_clustered = n - spec.window - kSinks;
  for (int l = 0; l < kLayers; ++l) {
    for (int g = 0; g < kKvHeads; ++g) {
      const float* k = data.kf[l].data() + static_cast<size_t>(g) * n * kHeadDim;
      const float* v = data.vf[l].data() + static_cast<size_t>(g) * n * kHeadDim;
      uint64_t sum = 0;
      for (int64_t i = 0; i < n; ++i) sum += RowHash(k + i * kHeadDim, v + i * kHeadDim);
      out->row_hash.push_back(sum);
      // The always set: sinks, then the window, in token order.
      std::vector<float> ak, av;
      for (int64_t i = 0; i < n; ++i) {
        if (i >= kSinks && i < kSinks + n_clustered) continue;
        ak.insert(ak.end(), k + i * kHeadDim, k + (i + 1) * kHeadDim);
        av.insert(av.end(), v + i * kHeadDim, v + (i + 1) * kHeadDim);
      }
      out->always_k.push_back(std::move(ak));
      out->always_v.push_back(std::move(av));
    }
    // Dense attention of the version's queries over every token.
    std::vector<double> o(static_cast<size_t>(kQHeads) * kT * kHeadDim), lse(static_cast<size_t>(kQHeads) * kT);
    const std::vector<Segment> all = {Segment{0, static_cast<uint32_t>(n)}};
    for (int qh = 0; qh < kQHeads; ++qh) {
      const size_t head = static_cast<size_t>(qh / kGroup) * n * kHeadDim;
      for (int t = 0; t < kT; ++t) {
        const size_t row = static_cast<size_t>(qh) * kT + t;
        ReferenceAttend(data.queries[l].data() + row * kHeadDim, data.kf[l].data() + head, data.vf[l].data() + head,
                        all, o.data() + row * kHeadDim, &lse[row]);
      }
    }
    out->queries.push_back(data.queries[l]);
    out->dense_o.push_back(std::move(o));
    out->dense_lse.push_back(std::move(lse));
  }
}

std::shared_ptr<const Reference> ReferenceCache::Get(const std::string& name, uint64_t gen) {
  const auto key = std::make_pair(name, gen);
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = refs_.find(key);
    if (it != refs_.end()) return it->second;
  }
  auto ref = std::make_shared<Reference>();
  ComputeReference(SpecOf(name, gen), ref.get());
  std::lock_guard<std::mutex> lock(mu_);
  return refs_.emplace(key, std::move(ref)).first->second;
}

Status IdRegistry::See(uint64_t id, const std::string& name, uint64_t gen) {
  std::lock_guard<std::mutex> lock(mu_);
  auto [it, fresh] = ids_.emplace(id, std::make_pair(name, gen));
  if (fresh || it->second == std::make_pair(name, gen)) return Status::OK();
  return Status::Corruption("database id " + std::to_string(id) + " reused: it held '" + it->second.first + "' gen " +
                            std::to_string(it->second.second) + ", now '" + name + "' gen " + std::to_string(gen));
}

Status CheckHandle(const ContextHandle& h, const std::string& name, const std::set<uint64_t>& allowed,
                   ReferenceCache* cache, IdRegistry* ids, uint64_t seed, CheckCounters* counters, uint64_t* gen_out) {
  const ContextInfo& info = h.info();
  std::string claimed;
  uint64_t gen = 0;
  if (!ParseModel(info.model, &claimed, &gen)) {
    return Status::Corruption("context '" + name + "' (id " + std::to_string(info.id) + "): model '" + info.model +
                              "' is not a stress version");
  }
  const std::string what =
      "context '" + name + "' gen " + std::to_string(gen) + " (id " + std::to_string(info.id) + ")";
  if (claimed != name || info.name != name) {
    return Status::Corruption(what + ": holds the data of context '" + claimed + "' (info.name '" + info.name + "')");
  }
  if (!allowed.count(gen)) {
    return Status::Corruption(what + ": serves gen " + std::to_string(gen) + ", the oracle allows " +
                              AllowedToString(allowed));
  }
  *gen_out = gen;
  if (ids) SQZ_RETURN_IF_ERROR(ids->See(info.id, name, gen));
  std::shared_ptr<const Reference> ref = cache->Get(name, gen);
  const VersionSpec& spec = ref->spec;
  const int64_t n = spec.n_tokens;
  const int64_t n_clustered = n - spec.window - kSinks;
  if (info.n_layers != kLayers || info.n_kv_heads != kKvHeads || info.n_q_heads != kQHeads ||
      info.head_dim != kHeadDim || info.n_tokens != n || info.dtype != spec.dtype || info.window != spec.window ||
      info.n_sinks != kSinks || info.page_rows != spec.page_rows || info.n_clustered != n_clustered ||
      (info.calibration_queries > 0) != spec.calibrated) {
    return Status::Corruption(what + ": its ContextInfo does not match the version (n_tokens " +
                              std::to_string(info.n_tokens) + " want " + std::to_string(n) + ", dtype " +
                              DTypeName(info.dtype) + " want " + DTypeName(spec.dtype) + ", window " +
                              std::to_string(info.window) + " want " + std::to_string(spec.window) + ", page_rows " +
                              std::to_string(info.page_rows) + " want " + std::to_string(spec.page_rows) + ")");
  }
  if (h.kv_head_begin() != 0 || h.kv_head_end() != kKvHeads) {
    return Status::Corruption(what + ": the handle does not serve every KV head");
  }

  // Every stored row, against the version's (layer, KV head) multiset.
  std::vector<std::vector<float>> rows_k(kLayers * kKvHeads), rows_v(kLayers * kKvHeads);
  for (int l = 0; l < kLayers; ++l) {
    for (int g = 0; g < kKvHeads; ++g) {
      const int lg = l * kKvHeads + g;
      const std::string where = what + " layer " + std::to_string(l) + " KV head " + std::to_string(g);
      rows_k[lg].resize(static_cast<size_t>(n) * kHeadDim);
      rows_v[lg].resize(rows_k[lg].size());
      SQZ_RETURN_IF_ERROR(
          h.ReadRows(l, g, 0, n, rows_k[lg].data(), rows_v[lg].data()).WithPrefix(where + ": ReadRows"));
      uint64_t sum = 0;
      for (int64_t i = 0; i < n; ++i) sum += RowHash(&rows_k[lg][i * kHeadDim], &rows_v[lg][i * kHeadDim]);
      if (sum != ref->row_hash[lg]) {
        return Status::Corruption(where + ": the stored (key, value) rows differ from the version's");
      }
      const size_t always = static_cast<size_t>(n - n_clustered) * kHeadDim;
      if (std::memcmp(&rows_k[lg][n_clustered * kHeadDim], ref->always_k[lg].data(), always * 4) != 0 ||
          std::memcmp(&rows_v[lg][n_clustered * kHeadDim], ref->always_v[lg].data(), always * 4) != 0) {
        return Status::Corruption(where + ": the always rows (sinks, window) differ from the version's");
      }
      counters->rows += n;
    }
  }

  // Dense attention over every layer.
  std::vector<float> o(static_cast<size_t>(kQHeads) * kT * kHeadDim), lse(static_cast<size_t>(kQHeads) * kT);
  QueryOptions dense;
  dense.mode = SelectionMode::kDense;
  for (int l = 0; l < kLayers; ++l) {
    SQZ_RETURN_IF_ERROR(h.Attend(l, ref->queries[l].data(), kT, dense, o.data(), lse.data())
                            .WithPrefix(what + ": dense Attend layer " + std::to_string(l)));
    ++counters->queries;
    for (size_t row = 0; row < lse.size(); ++row) {
      const double err =
          RowError(&o[row * kHeadDim], lse[row], &ref->dense_o[l][row * kHeadDim], ref->dense_lse[l][row]);
      if (!(err < kTolerance)) {
        return Status::Corruption(what + ": dense Attend layer " + std::to_string(l) + " row " + std::to_string(row) +
                                  " is off the reference by " + std::to_string(err));
      }
    }
  }

  // One random sparse configuration: plan well formed, Attend = attention over the planned rows.
  std::mt19937_64 rng(seed);
  auto pick = [&rng](int n_choices) { return static_cast<int>(rng() % static_cast<uint64_t>(n_choices)); };
  QueryOptions qo;
  const double budgets[] = {0.05, 0.125, 0.25, 0.5, 1.0};
  const double quantiles[] = {0.5, 0.7, 0.8, 0.9, 0.95};
  const int mode = pick(spec.calibrated ? 5 : 4);
  qo.mode = mode == 4 ? SelectionMode::kThreshold : mode == 3 ? SelectionMode::kDense : SelectionMode::kBudget;
  qo.budget = budgets[pick(5)];
  qo.threshold_quantile = quantiles[pick(5)];
  if (qo.mode != SelectionMode::kThreshold) qo.threshold_quantile = -1;
  qo.hierarchical = pick(2) == 0;
  qo.gqa = pick(2) == 0 ? GqaPolicy::kUnion : GqaPolicy::kPerHead;
  qo.per_query_selection = pick(2) == 0;
  const int layer = pick(kLayers);
  const int T = pick(2) == 0 ? 1 : kT;
  std::vector<float> q(static_cast<size_t>(kQHeads) * T * kHeadDim);
  for (int qh = 0; qh < kQHeads; ++qh) {
    for (int t = 0; t < T; ++t) {
      std::memcpy(&q[(static_cast<size_t>(qh) * T + t) * kHeadDim],
                  &ref->queries[layer][(static_cast<size_t>(qh) * kT + t) * kHeadDim], kHeadDim * 4);
    }
  }
  const std::string cfg = what + ": " + OptionsToString(qo, layer, T);
  SegmentTable table;
  SQZ_RETURN_IF_ERROR(h.Plan(layer, q.data(), T, qo, &table).WithPrefix(cfg + ": Plan"));
  o.assign(q.size(), 0.f);
  lse.assign(static_cast<size_t>(kQHeads) * T, 0.f);
  SQZ_RETURN_IF_ERROR(h.Attend(layer, q.data(), T, qo, o.data(), lse.data()).WithPrefix(cfg + ": Attend"));
  ++counters->queries;
  if (table.T != T || table.group_size != kGroup || table.n_kv_heads != kKvHeads ||
      table.row_set.size() != static_cast<size_t>(kQHeads) * T ||
      table.set_kv_head.size() != static_cast<size_t>(table.n_sets())) {
    return Status::Corruption(cfg + ": malformed segment table");
  }
  for (int s = 0; s < table.n_sets(); ++s) {
    const uint32_t b = table.set_offsets[s], e = table.set_offsets[s + 1];
    if (b >= e || e > table.segments.size()) return Status::Corruption(cfg + ": set " + std::to_string(s) + " empty");
    const Segment& last = table.segments[e - 1];
    if (last.first_row != static_cast<uint32_t>(n_clustered) || last.n_rows != static_cast<uint32_t>(n - n_clustered)) {
      return Status::Corruption(cfg + ": set " + std::to_string(s) + " does not end with the always set");
    }
    int64_t clustered = 0;
    uint32_t end = 0;
    for (uint32_t i = b; i + 1 < e; ++i) {
      const Segment& seg = table.segments[i];
      if (seg.n_rows == 0 || (i > b && seg.first_row <= end) ||
          static_cast<int64_t>(seg.first_row) + seg.n_rows > n_clustered) {
        return Status::Corruption(cfg + ": set " + std::to_string(s) +
                                  " has overlapping, adjacent or out-of-range "
                                  "segments");
      }
      end = seg.first_row + seg.n_rows;
      clustered += seg.n_rows;
    }
    const bool budget_rule = qo.mode == SelectionMode::kBudget && !qo.hierarchical;
    if ((qo.mode == SelectionMode::kDense && clustered != n_clustered) ||
        (budget_rule && static_cast<double>(clustered) < std::min(1.0, qo.budget) * static_cast<double>(n_clustered))) {
      return Status::Corruption(cfg + ": set " + std::to_string(s) + " keeps " + std::to_string(clustered) + " of " +
                                std::to_string(n_clustered) + " clustered rows");
    }
  }
  std::vector<double> ref_o(kHeadDim);
  for (int hh = 0; hh < kKvHeads; ++hh) {
    const int lg = layer * kKvHeads + hh;
    for (int g = 0; g < kGroup; ++g) {
      for (int t = 0; t < T; ++t) {
        const size_t row = (static_cast<size_t>(hh) * kGroup + g) * T + t;
        const int s = table.row_set[row];
        if (s < 0 || s >= table.n_sets() || table.set_kv_head[s] != hh) {
          return Status::Corruption(cfg + ": row " + std::to_string(row) + " names a set of another KV head");
        }
        const std::vector<Segment> segs(table.segments.begin() + table.set_offsets[s],
                                        table.segments.begin() + table.set_offsets[s + 1]);
        double ref_lse = 0;
        ReferenceAttend(&q[row * kHeadDim], rows_k[lg].data(), rows_v[lg].data(), segs, ref_o.data(), &ref_lse);
        const double err = RowError(&o[row * kHeadDim], lse[row], ref_o.data(), ref_lse);
        if (!(err < kTolerance)) {
          return Status::Corruption(cfg + ": row " + std::to_string(row) +
                                    " is off attention over its planned rows by " + std::to_string(err));
        }
      }
    }
  }
  ++counters->handles;
  return Status::OK();
}

}  // namespace sqz::stress
