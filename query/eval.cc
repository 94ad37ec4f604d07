#include "query/eval.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <new>
#include <numeric>
#include <sstream>

#include "util/safetensors.h"

namespace sqz::query {

namespace {

// The dense reference of one (query head, query).
struct DenseRow {
  std::vector<double> row_prefix;     // [n_tokens + 1]: true mass of stored rows [0, r)
  std::vector<double> sorted_prefix;  // [n_clustered + 1]: mass of the top-k clustered keys
  double always_mass = 0;             // true mass on the always set
  std::vector<double> o;              // [d]: dense output
  double o_norm = 0;

  // True mass on the rows of `segments`.
  double Mass(const Segment* segments, size_t n) const {
    double m = 0;
    for (size_t i = 0; i < n; ++i)
      m += row_prefix[segments[i].first_row + segments[i].n_rows] - row_prefix[segments[i].first_row];
    return m;
  }
};

// Sums for one aggregate.
struct Acc {
  int64_t n = 0;
  double recall = 0, recall_min = INFINITY, oracle = 0, oracle_min = INFINITY;
  double error = 0, error_max = 0, keys_fraction = 0;

  void Add(double r, double orc, double err, double kf) {
    ++n;
    recall += r;
    recall_min = std::min(recall_min, r);
    oracle += orc;
    oracle_min = std::min(oracle_min, orc);
    error += err;
    error_max = std::max(error_max, err);
    keys_fraction += kf;
  }
  EvalAggregate Finish() const {
    EvalAggregate a;
    a.samples = n;
    if (n == 0) return a;
    a.recall_mean = recall / n;
    a.recall_min = recall_min;
    a.oracle_mean = oracle / n;
    a.oracle_min = oracle_min;
    a.ratio = a.oracle_mean > 0 ? a.recall_mean / a.oracle_mean : 1.0;
    a.error_mean = error / n;
    a.error_max = error_max;
    a.keys_fraction = keys_fraction / n;
    return a;
  }
};

struct ConfigAcc {
  Acc kinds[2];  // concentrated, spread
  Acc all;
  std::vector<Acc> heads;  // per (layer, query head), EvalReport::heads order
  int64_t keys_read = 0, keys_clustered = 0;
  uint64_t bytes_read = 0, bytes_dense = 0;
  double seconds = 0;
};

// Dense attention of one query over all n rows of a head (k, v [n, d] in the
// stored order: n_clustered clustered rows, then the always set), in double.
void DenseReference(const float* q, const std::vector<float>& k, const std::vector<float>& v, int64_t n,
                    int64_t n_clustered, int d, double scale, DenseRow* out, std::vector<double>* p) {
  p->resize(n);
  double m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    double dot = 0;
    for (int c = 0; c < d; ++c) dot += static_cast<double>(q[c]) * k[i * d + c];
    (*p)[i] = scale * dot;
    m = std::max(m, (*p)[i]);
  }
  double z = 0;
  for (int64_t i = 0; i < n; ++i) {
    (*p)[i] = std::exp((*p)[i] - m);
    z += (*p)[i];
  }
  out->o.assign(d, 0.0);
  out->row_prefix.assign(n + 1, 0.0);
  double acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    (*p)[i] /= z;
    for (int c = 0; c < d; ++c) out->o[c] += (*p)[i] * v[i * d + c];
    acc += (*p)[i];
    out->row_prefix[i + 1] = acc;
  }
  out->o_norm = 0;
  for (double x : out->o) out->o_norm += x * x;
  out->o_norm = std::sqrt(out->o_norm);
  out->always_mass = std::accumulate(p->begin() + n_clustered, p->end(), 0.0);
  std::vector<double> clustered(p->begin(), p->begin() + n_clustered);
  std::sort(clustered.begin(), clustered.end(), std::greater<double>());
  out->sorted_prefix.assign(clustered.size() + 1, 0.0);
  acc = 0;
  for (size_t i = 0; i < clustered.size(); ++i) {
    acc += clustered[i];
    out->sorted_prefix[i + 1] = acc;
  }
}

std::string Num(double x, int prec = 4) {
  char buf[64];
  if (!std::isfinite(x)) return "null";
  std::snprintf(buf, sizeof(buf), "%.*g", prec, x);
  return buf;
}

// Physical memory, and the address-space limit when one is set (ulimit -v).
uint64_t MemoryLimitBytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  uint64_t limit = pages > 0 && page > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page) : UINT64_MAX;
  struct rlimit rl;
  if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
    limit = std::min<uint64_t>(limit, rl.rlim_cur);
  }
  return limit;
}

}  // namespace

Status ReadQueriesFile(const std::string& path, const ContextInfo& info, std::vector<LayerQueries>* out) {
  out->clear();
  std::unique_ptr<SafetensorsFile> file;
  SQZ_RETURN_IF_ERROR(SafetensorsFile::Open(path, &file));
  uint64_t total_bytes = 0;
  for (const SafetensorsEntry& e : file->entries()) {
    // "layers.<i>.q" with i in canonical decimal; other tensors may share the
    // file, but a query tensor whose index is malformed or too large is an
    // error, never silently skipped.
    const std::string prefix = "layers.", suffix = ".q";
    if (e.name.size() <= prefix.size() + suffix.size() || e.name.compare(0, prefix.size(), prefix) != 0 ||
        e.name.compare(e.name.size() - suffix.size(), suffix.size(), suffix) != 0) {
      continue;
    }
    const std::string where = path + ": tensor '" + e.name + "'";
    const std::string digits = e.name.substr(prefix.size(), e.name.size() - prefix.size() - suffix.size());
    if (digits.find('.') != std::string::npos) continue;  // e.g. layers.0.attn.q: not a query tensor
    if (digits.empty() || digits.size() > 9 || (digits[0] == '0' && digits.size() > 1) ||
        !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      return Status::InvalidArgument(where + ": not a valid query tensor name (expected layers.<i>.q with i < " +
                                     std::to_string(info.n_layers) +
                                     " written in decimal without leading zeros) for context '" + info.name + "'");
    }
    const int layer = std::stoi(digits);
    if (layer >= info.n_layers) {
      return Status::InvalidArgument(where + ": context '" + info.name + "' has only " + std::to_string(info.n_layers) +
                                     " layers");
    }
    if (!e.dtype_supported) {
      return Status::InvalidArgument(where + ": dtype " + e.dtype_name + " is not F32, F16 or BF16");
    }
    if (e.shape.size() != 3 || e.shape[0] != info.n_q_heads || e.shape[1] < 1 || e.shape[1] > (1 << 30) ||
        e.shape[2] != info.head_dim) {
      return Status::InvalidArgument(
          where + ": shape " + ShapeToString(e.shape) + " does not match [n_q_heads=" + std::to_string(info.n_q_heads) +
          ", T >= 1, head_dim=" + std::to_string(info.head_dim) + "] of context '" + info.name + "'");
    }
    // The queries, and the outputs of the same shape the caller will need,
    // must fit in memory: checked before allocating (a sparse file can
    // declare T = 2^30 and pass every size check against the file).
    const uint64_t numel = static_cast<uint64_t>(e.shape[0]) * e.shape[1] * e.shape[2];
    total_bytes += 2 * numel * sizeof(float);
    const uint64_t limit = MemoryLimitBytes();
    if (total_bytes > limit) {
      return Status::InvalidArgument(where + ": shape " + ShapeToString(e.shape) + " declares " +
                                     std::to_string(e.shape[1]) + " queries; with their outputs the file needs " +
                                     std::to_string(total_bytes >> 20) + " MiB of memory, more than this machine's " +
                                     std::to_string(limit >> 20) + " MiB: split the queries into smaller files");
    }
    LayerQueries lq;
    lq.layer = layer;
    lq.T = static_cast<int>(e.shape[1]);
    try {
      lq.q.resize(static_cast<size_t>(numel));
    } catch (const std::bad_alloc&) {
      return Status::IOError(where + ": out of memory allocating " + std::to_string(numel * sizeof(float) >> 20) +
                             " MiB for the queries");
    }
    SQZ_RETURN_IF_ERROR(file->ReadFloat(e, lq.q.data()));
    for (size_t i = 0; i < lq.q.size(); ++i) {
      if (!std::isfinite(lq.q[i])) {
        return Status::InvalidArgument(where + ": value " + std::to_string(i) + " is NaN or Inf");
      }
    }
    out->push_back(std::move(lq));
  }
  if (out->empty())
    return Status::InvalidArgument(path + ": no layers.{i}.q tensor (queries [n_q_heads, T, head_dim])");
  std::sort(out->begin(), out->end(), [](const LayerQueries& a, const LayerQueries& b) { return a.layer < b.layer; });
  for (size_t i = 1; i < out->size(); ++i) {
    if ((*out)[i].layer == (*out)[i - 1].layer) {
      return Status::InvalidArgument(path + ": layer " + std::to_string((*out)[i].layer) + " appears twice");
    }
  }
  return Status::OK();
}

std::vector<EvalConfig> DefaultEvalConfigs(const ContextInfo& info, const std::vector<double>& budgets,
                                           bool per_query_selection) {
  std::vector<EvalConfig> out;
  QueryOptions base;
  base.per_query_selection = per_query_selection;
  {
    EvalConfig c{"dense", base};
    c.options.mode = SelectionMode::kDense;
    out.push_back(c);
  }
  for (double b : budgets) {
    for (bool hier : {false, true}) {
      EvalConfig c{"budget=" + Num(b) + (hier ? " hier" : " flat"), base};
      c.options.mode = SelectionMode::kBudget;
      c.options.budget = b;
      c.options.hierarchical = hier;
      out.push_back(c);
    }
  }
  if (info.calibration_queries > 0) {
    for (const ThresholdInfo& t : info.thresholds) {
      for (bool hier : {false, true}) {
        EvalConfig c{"tau@" + Num(t.quantile) + (hier ? " hier" : " flat"), base};
        c.options.mode = SelectionMode::kThreshold;
        c.options.threshold_quantile = t.quantile;
        c.options.hierarchical = hier;
        out.push_back(c);
      }
    }
  }
  return out;
}

Status Evaluate(const ContextHandle& handle, const std::vector<LayerQueries>& queries,
                const std::vector<EvalConfig>& configs, const EvalOptions& options, EvalReport* report) {
  // Only the public interface: any engine can be evaluated.
  const ContextHandle& impl = handle;
  const ContextInfo& info = impl.info();
  const int d = info.head_dim, G = info.group_size(), n_q = info.n_q_heads;
  if (impl.kv_head_begin() != 0 || impl.kv_head_end() != info.n_kv_heads) {
    return Status::InvalidArgument("eval needs a handle that serves every KV head of context '" + info.name + "'");
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const int64_t n_clustered = info.n_clustered;
  const int64_t classify_k =
      std::min<int64_t>(n_clustered, static_cast<int64_t>(std::ceil(options.classify_budget * n_clustered)));

  *report = EvalReport();
  report->context = info.name;
  std::vector<ConfigAcc> acc(configs.size());

  for (const LayerQueries& lq : queries) {
    const int layer = lq.layer, T = lq.T;
    const std::string where = "context '" + info.name + "' layer " + std::to_string(layer);
    if (T < 1 || lq.q.size() != static_cast<size_t>(n_q) * T * d) {
      return Status::InvalidArgument(where + ": queries have " + std::to_string(lq.q.size()) +
                                     " values, expected n_q_heads * T * head_dim = " + std::to_string(n_q) + " * " +
                                     std::to_string(T) + " * " + std::to_string(d));
    }
    ++report->layers;

    // Dense reference, one KV head at a time (its blocks, all of them).
    std::vector<DenseRow> dense(static_cast<size_t>(n_q) * T);
    std::vector<double> p;
    uint64_t layer_dense_bytes = 0;  // what one dense Attend call reads
    std::vector<float> k(static_cast<size_t>(info.n_tokens) * d), v(k.size());
    for (int g = 0; g < info.n_kv_heads; ++g) {
      uint64_t bytes = 0;
      SQZ_RETURN_IF_ERROR(impl.ReadRows(layer, g, 0, info.n_tokens, k.data(), v.data(), &bytes));
      layer_dense_bytes += bytes;
      for (int qh = g * G; qh < (g + 1) * G; ++qh) {
        for (int t = 0; t < T; ++t) {
          const float* q = lq.q.data() + (static_cast<int64_t>(qh) * T + t) * d;
          DenseReference(q, k, v, info.n_tokens, n_clustered, d, scale, &dense[static_cast<size_t>(qh) * T + t], &p);
        }
      }
    }

    // Head kinds from the dense attention.
    const size_t head_base = report->heads.size();
    std::vector<int> kind(n_q);
    for (int qh = 0; qh < n_q; ++qh) {
      double mass = 0;
      for (int t = 0; t < T; ++t) {
        const DenseRow& r = dense[static_cast<size_t>(qh) * T + t];
        mass += r.always_mass + r.sorted_prefix[classify_k];
      }
      kind[qh] = mass / T >= options.classify_mass ? 0 : 1;
      (kind[qh] == 0 ? report->heads_concentrated : report->heads_spread)++;
      report->heads.push_back({layer, qh, kind[qh] == 0, mass / T});
    }

    for (size_t ci = 0; ci < configs.size(); ++ci) {
      const QueryOptions& qo = configs[ci].options;
      acc[ci].heads.resize(report->heads.size());
      if (qo.softmax_scale != 0 && qo.softmax_scale != static_cast<float>(scale)) {
        return Status::InvalidArgument("eval compares against the default softmax scale; config '" + configs[ci].name +
                                       "' sets another");
      }
      // Per-query selection is evaluated as decode: one Attend call per query
      // (so reads are those of one step); shared selection as one prefill.
      const int calls = qo.per_query_selection ? T : 1;
      const int Tc = T / calls;
      std::vector<float> qc(static_cast<size_t>(n_q) * Tc * d), o(qc.size()), lse(static_cast<size_t>(n_q) * Tc);
      for (int call = 0; call < calls; ++call) {
        const int t0 = call * Tc;
        for (int qh = 0; qh < n_q; ++qh) {
          std::copy_n(lq.q.data() + (static_cast<int64_t>(qh) * T + t0) * d, static_cast<int64_t>(Tc) * d,
                      qc.data() + static_cast<int64_t>(qh) * Tc * d);
        }
        AttendStats stats;
        const auto start = std::chrono::steady_clock::now();
        Status s = impl.Attend(layer, qc.data(), Tc, qo, o.data(), lse.data(), &stats);
        acc[ci].seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (!s.ok()) return s.WithPrefix("config '" + configs[ci].name + "'");
        SegmentTable table;
        SQZ_RETURN_IF_ERROR(impl.Plan(layer, qc.data(), Tc, qo, &table));
        acc[ci].bytes_dense += layer_dense_bytes;

        for (int g = 0; g < info.n_kv_heads; ++g) {
          acc[ci].keys_read += stats.heads[g].keys_selected;
          acc[ci].keys_clustered += n_clustered;
          acc[ci].bytes_read += stats.heads[g].bytes_read;
          for (int gl = 0; gl < G; ++gl) {
            const int qh = g * G + gl;
            for (int tc = 0; tc < Tc; ++tc) {
              const DenseRow& r = dense[static_cast<size_t>(qh) * T + t0 + tc];
              const int32_t set = table.row_set[(static_cast<size_t>(g) * G + gl) * Tc + tc];
              const Segment* segs = table.segments.data() + table.set_offsets[set];
              const size_t n_segs = table.set_offsets[set + 1] - table.set_offsets[set];
              const double recall = r.Mass(segs, n_segs);
              int64_t keys = 0;
              for (size_t i = 0; i < n_segs; ++i) {
                if (segs[i].first_row < n_clustered) keys += segs[i].n_rows;
              }
              const double oracle = r.always_mass + r.sorted_prefix[std::min<int64_t>(keys, n_clustered)];
              const float* ot = o.data() + (static_cast<int64_t>(qh) * Tc + tc) * d;
              double diff = 0;
              for (int c = 0; c < d; ++c) diff += (ot[c] - r.o[c]) * (ot[c] - r.o[c]);
              const double err = r.o_norm > 0 ? std::sqrt(diff) / r.o_norm : std::sqrt(diff);
              const double kf = n_clustered > 0 ? static_cast<double>(keys) / n_clustered : 0.0;
              acc[ci].kinds[kind[qh]].Add(recall, oracle, err, kf);
              acc[ci].all.Add(recall, oracle, err, kf);
              acc[ci].heads[head_base + qh].Add(recall, oracle, err, kf);
            }
          }
        }
      }
    }
  }

  for (size_t ci = 0; ci < configs.size(); ++ci) {
    EvalConfigResult r;
    r.config = configs[ci];
    r.all = acc[ci].all.Finish();
    r.concentrated = acc[ci].kinds[0].Finish();
    r.spread = acc[ci].kinds[1].Finish();
    for (const Acc& h : acc[ci].heads) r.per_head.push_back(h.Finish());
    r.read_fraction =
        acc[ci].keys_clustered > 0 ? static_cast<double>(acc[ci].keys_read) / acc[ci].keys_clustered : 0.0;
    r.bytes_read = acc[ci].bytes_read;
    r.bytes_dense = acc[ci].bytes_dense;
    r.seconds = acc[ci].seconds;
    report->results.push_back(std::move(r));
  }
  return Status::OK();
}

std::string FormatEvalReport(const EvalReport& report) {
  std::ostringstream os;
  os << "context '" << report.context << "': " << report.layers
     << " layer(s); (layer, query head) pairs: " << report.heads_concentrated << " concentrated, "
     << report.heads_spread << " spread\n";
  char line[512];
  std::snprintf(line, sizeof(line), "%-20s %-13s %7s %8s %8s %8s %9s %9s %8s %8s %8s\n", "config", "heads", "recall",
                "worst", "oracle", "rec/orc", "err_mean", "err_worst", "keys", "read", "bytes");
  os << line;
  for (const EvalConfigResult& r : report.results) {
    const std::pair<const char*, const EvalAggregate*> kinds[] = {
        {"all", &r.all}, {"concentrated", &r.concentrated}, {"spread", &r.spread}};
    for (const auto& [name, a] : kinds) {
      if (a->samples == 0) continue;
      const bool first = a == &r.all;
      std::snprintf(
          line, sizeof(line), "%-20s %-13s %7.4f %8.4f %8.4f %8.4f %9.2e %9.2e %8.4f %8s %8s\n",
          first ? r.config.name.c_str() : "", name, a->recall_mean, a->recall_min, a->oracle_mean, a->ratio,
          a->error_mean, a->error_max, a->keys_fraction, first ? Num(r.read_fraction, 4).c_str() : "",
          first ? Num(r.bytes_dense ? static_cast<double>(r.bytes_read) / r.bytes_dense : 0.0, 4).c_str() : "");
      os << line;
    }
  }
  os << "recall: true attention mass on the attended keys; oracle: best possible with as many keys; "
        "err: ||O - O_dense|| / ||O_dense||;\nkeys: clustered keys attended per query head (fraction); "
        "read: clustered keys read per call and KV head (fraction);\nbytes: KV bytes read / dense KV bytes "
        "(always set included). Per-query selection runs one call per query (decode).\n";
  return os.str();
}

}  // namespace sqz::query
