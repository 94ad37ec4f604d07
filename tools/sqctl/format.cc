#include "format.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>

#include "cli.h"

namespace sqz::cli {

std::string FormatBytes(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.1f %s", v, units[u]);
  return buf;
}

std::string FormatSeconds(double s) {
  char buf[32];
  if (!std::isfinite(s) || s < 0) return "?";
  if (s < 1e-3)
    std::snprintf(buf, sizeof(buf), "%.0f us", s * 1e6);
  else if (s < 1)
    std::snprintf(buf, sizeof(buf), "%.1f ms", s * 1e3);
  else if (s < 120)
    std::snprintf(buf, sizeof(buf), "%.1f s", s);
  else if (s < 7200)
    std::snprintf(buf, sizeof(buf), "%dm%02ds", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
  else
    std::snprintf(buf, sizeof(buf), "%dh%02dm", static_cast<int>(s) / 3600, (static_cast<int>(s) / 60) % 60);
  return buf;
}

namespace {
void MinMaxSum(const std::vector<int32_t>& v, int32_t* mn, int32_t* mx, int64_t* sum) {
  *mn = v.empty() ? 0 : *std::min_element(v.begin(), v.end());
  *mx = v.empty() ? 0 : *std::max_element(v.begin(), v.end());
  *sum = 0;
  for (int32_t x : v) *sum += x;
}
std::string Date(int64_t unix) {
  char buf[64];
  std::time_t t = static_cast<std::time_t>(unix);
  std::tm tm{};
  gmtime_r(&t, &tm);
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S UTC", &tm);
  return buf;
}
}  // namespace

std::string PrintableName(const std::string& name) {
  std::string out;
  for (char c : name) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\r') {
      out += "\\r";
    } else if (u < 0x20 || u == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", u);
      out += buf;
    } else {
      out += c;
    }
  }
  return out;
}

std::string ContextInfoText(const ContextInfo& i) {
  std::string out;
  // Each line sized to fit (a context name may be any length).
  auto line = [&](const char* fmt, auto... a) {
    const int n = std::snprintf(nullptr, 0, fmt, a...);
    if (n <= 0) return;
    const size_t at = out.size();
    out.resize(at + static_cast<size_t>(n) + 1);
    std::snprintf(out.data() + at, static_cast<size_t>(n) + 1, fmt, a...);
    out.resize(at + static_cast<size_t>(n));
  };
  int32_t fmin, fmax, cmin, cmax;
  int64_t fsum, csum;
  MinMaxSum(i.fine_clusters, &fmin, &fmax, &fsum);
  MinMaxSum(i.coarse_clusters, &cmin, &cmax, &csum);
  line("context        %s (id %llu)\n", PrintableName(i.name).c_str(), static_cast<unsigned long long>(i.id));
  line("model          %s\n", i.model.empty() ? "-" : PrintableName(i.model).c_str());
  line("shape          %d layers, %d query heads / %d KV heads, head_dim %d, %lld tokens, %s\n", i.n_layers,
       i.n_q_heads, i.n_kv_heads, i.head_dim, static_cast<long long>(i.n_tokens), DTypeName(i.dtype));
  line("always kept    %d sink + %d window tokens; %lld clustered tokens per head\n", i.n_sinks, i.window,
       static_cast<long long>(i.n_clustered));
  line("fine level     ratio %.3f: %d..%d clusters per head (%lld in all)\n", i.fine_ratio, fmin, fmax,
       static_cast<long long>(fsum));
  line("coarse level   ratio %.3f: %d..%d clusters per head (%lld in all)\n", i.coarse_ratio, cmin, cmax,
       static_cast<long long>(csum));
  line("k-means        %d iterations, seed %llu\n", i.kmeans_iters, static_cast<unsigned long long>(i.seed));
  {
    std::string hist;
    for (size_t b = 0; b < i.cluster_size_histogram.size(); ++b) {
      if (i.cluster_size_histogram[b] == 0) continue;
      hist += (hist.empty() ? "" : ", ") + std::string("[") + std::to_string(int64_t{1} << b) + "," +
              std::to_string(int64_t{1} << (b + 1)) + "): " + std::to_string(i.cluster_size_histogram[b]);
    }
    line("cluster sizes  %s\n", hist.empty() ? "-" : hist.c_str());
  }
  line("KV pages       %d rows each (%s); %lld clustered + %lld always pages per head (format version %u)\n",
       i.page_rows, FormatBytes(i.page_bytes()).c_str(), static_cast<long long>(i.clustered_pages),
       static_cast<long long>(i.always_pages), i.format_version);
  if (i.calibration_queries > 0) {
    line("thresholds     calibrated on %d window queries per head\n", i.calibration_queries);
    line("               %8s %12s %12s %12s\n", "quantile", "flat", "hier coarse", "hier fine");
    for (const auto& t : i.thresholds) {
      line("               %8.3f %12.4g %12.4g %12.4g\n", t.quantile, t.flat, t.coarse, t.fine);
    }
  } else {
    line("thresholds     not calibrated (no q_window in the KV file): use budget mode\n");
  }
  line("bytes          KV %s raw, index %s raw, %s on disk\n", FormatBytes(i.kv_bytes).c_str(),
       FormatBytes(i.index_bytes).c_str(), FormatBytes(i.bytes_on_disk).c_str());
  line("built          %s in %s\n", Date(i.created_unix).c_str(), FormatSeconds(i.build_seconds).c_str());
  if (!i.damage.empty()) line("DAMAGED        %s\n", i.damage.c_str());
  return out;
}

std::string ContextInfoJson(const ContextInfo& i) {
  Json thresholds = Json::array();
  for (const auto& t : i.thresholds) {
    thresholds.push_back({{"quantile", t.quantile},
                          {"flat", JsonFloat(t.flat)},
                          {"coarse", JsonFloat(t.coarse)},
                          {"fine", JsonFloat(t.fine)}});
  }
  Json j;
  j["name"] = i.name;
  j["id"] = i.id;
  j["model"] = i.model;
  j["n_layers"] = i.n_layers;
  j["n_q_heads"] = i.n_q_heads;
  j["n_kv_heads"] = i.n_kv_heads;
  j["head_dim"] = i.head_dim;
  j["n_tokens"] = i.n_tokens;
  j["dtype"] = DTypeName(i.dtype);
  j["window"] = i.window;
  j["n_sinks"] = i.n_sinks;
  j["n_clustered"] = i.n_clustered;
  j["fine_ratio"] = i.fine_ratio;
  j["coarse_ratio"] = i.coarse_ratio;
  j["kmeans_iters"] = i.kmeans_iters;
  j["seed"] = i.seed;
  j["calibration_queries"] = i.calibration_queries;
  j["format_version"] = i.format_version;
  j["page_rows"] = i.page_rows;
  j["page_bytes"] = i.page_bytes();
  j["clustered_pages"] = i.clustered_pages;
  j["always_pages"] = i.always_pages;
  j["cluster_size_histogram"] = i.cluster_size_histogram;
  j["kv_bytes"] = i.kv_bytes;
  j["index_bytes"] = i.index_bytes;
  j["bytes_on_disk"] = i.bytes_on_disk;
  j["build_seconds"] = i.build_seconds;
  j["created_unix"] = i.created_unix;
  if (!i.damage.empty()) j["damage"] = i.damage;
  j["fine_clusters"] = i.fine_clusters;
  j["coarse_clusters"] = i.coarse_clusters;
  j["thresholds"] = std::move(thresholds);
  return JsonDump(j) + "\n";
}

namespace {
Json AggregateJson(const query::EvalAggregate& a) {
  Json j;
  j["samples"] = a.samples;
  j["recall_mean"] = a.recall_mean;
  j["recall_worst"] = a.recall_min;
  j["oracle_mean"] = a.oracle_mean;
  j["oracle_worst"] = a.oracle_min;
  j["recall_over_oracle"] = a.ratio;
  j["error_mean"] = a.error_mean;
  j["error_worst"] = a.error_max;
  j["keys_fraction"] = a.keys_fraction;
  return j;
}
// JSON has no NaN or infinity.
Json Finite(double x) { return std::isfinite(x) ? Json(x) : Json(nullptr); }
}  // namespace

std::string EvalReportJson(const query::EvalReport& report) {
  Json j;
  j["context"] = report.context;
  j["layers"] = report.layers;
  j["heads_concentrated"] = report.heads_concentrated;
  j["heads_spread"] = report.heads_spread;
  Json configs = Json::array();
  for (const query::EvalConfigResult& r : report.results) {
    const QueryOptions& o = r.config.options;
    Json c;
    c["name"] = r.config.name;
    c["mode"] = o.mode == SelectionMode::kDense ? "dense" : o.mode == SelectionMode::kBudget ? "budget" : "threshold";
    c["hierarchical"] = o.hierarchical;
    c["budget"] = Finite(o.budget);
    c["threshold_quantile"] = Finite(o.threshold_quantile);
    c["per_query_selection"] = o.per_query_selection;
    c["read_fraction"] = Finite(r.read_fraction);
    c["bytes_read"] = r.bytes_read;
    c["bytes_dense"] = r.bytes_dense;
    c["seconds"] = r.seconds;
    c["all"] = AggregateJson(r.all);
    c["concentrated"] = AggregateJson(r.concentrated);
    c["spread"] = AggregateJson(r.spread);
    // Per (layer, query head), in the order of "heads": recall and oracle means.
    Json recall = Json::array(), oracle = Json::array();
    for (const query::EvalAggregate& a : r.per_head) {
      recall.push_back(Finite(a.recall_mean));
      oracle.push_back(Finite(a.oracle_mean));
    }
    c["head_recall"] = std::move(recall);
    c["head_oracle"] = std::move(oracle);
    configs.push_back(std::move(c));
  }
  j["configs"] = std::move(configs);
  Json heads = Json::array();
  for (const query::EvalHead& h : report.heads) {
    heads.push_back({{"layer", h.layer},
                     {"q_head", h.q_head},
                     {"kind", h.concentrated ? "concentrated" : "spread"},
                     {"oracle_mass", Finite(h.oracle_mass)}});
  }
  j["heads"] = std::move(heads);
  return JsonDump(j);
}

}  // namespace sqz::cli
