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
  if (s < 1e-3) std::snprintf(buf, sizeof(buf), "%.0f us", s * 1e6);
  else if (s < 1) std::snprintf(buf, sizeof(buf), "%.1f ms", s * 1e3);
  else if (s < 120) std::snprintf(buf, sizeof(buf), "%.1f s", s);
  else if (s < 7200) std::snprintf(buf, sizeof(buf), "%dm%02ds", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
  else std::snprintf(buf, sizeof(buf), "%dh%02dm", static_cast<int>(s) / 3600, (static_cast<int>(s) / 60) % 60);
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

std::string ContextInfoText(const ContextInfo& i) {
  std::string out;
  char buf[512];
  auto line = [&](const char* fmt, auto... a) {
    std::snprintf(buf, sizeof(buf), fmt, a...);
    out += buf;
  };
  int32_t fmin, fmax, cmin, cmax;
  int64_t fsum, csum;
  MinMaxSum(i.fine_clusters, &fmin, &fmax, &fsum);
  MinMaxSum(i.coarse_clusters, &cmin, &cmax, &csum);
  line("context        %s (id %llu)\n", i.name.c_str(), static_cast<unsigned long long>(i.id));
  line("model          %s\n", i.model.empty() ? "-" : i.model.c_str());
  line("shape          %d layers, %d query heads / %d KV heads, head_dim %d, %lld tokens, %s\n", i.n_layers,
       i.n_q_heads, i.n_kv_heads, i.head_dim, static_cast<long long>(i.n_tokens), DTypeName(i.dtype));
  line("always kept    %d sink + %d window tokens; %lld clustered tokens per head\n", i.n_sinks, i.window,
       static_cast<long long>(i.n_clustered));
  line("fine level     ratio %.3f: %d..%d clusters per head (%lld in all)\n", i.fine_ratio, fmin, fmax,
       static_cast<long long>(fsum));
  line("coarse level   ratio %.3f: %d..%d clusters per head (%lld in all)\n", i.coarse_ratio, cmin, cmax,
       static_cast<long long>(csum));
  line("k-means        %d iterations, seed %llu\n", i.kmeans_iters, static_cast<unsigned long long>(i.seed));
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
  return out;
}

std::string ContextInfoJson(const ContextInfo& i) {
  auto arr = [](const std::vector<int32_t>& v) {
    std::string s = "[";
    for (size_t k = 0; k < v.size(); ++k) s += (k ? "," : "") + std::to_string(v[k]);
    return s + "]";
  };
  std::string th = "[";
  for (size_t k = 0; k < i.thresholds.size(); ++k) {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "%s{\"quantile\":%.6g,\"flat\":%.9g,\"coarse\":%.9g,\"fine\":%.9g}", k ? "," : "",
                  i.thresholds[k].quantile, i.thresholds[k].flat, i.thresholds[k].coarse, i.thresholds[k].fine);
    th += buf;
  }
  th += "]";
  char buf[1024];
  std::snprintf(buf, sizeof(buf),
                "{\"name\":\"%s\",\"id\":%llu,\"model\":\"%s\",\"n_layers\":%d,\"n_q_heads\":%d,\"n_kv_heads\":%d,"
                "\"head_dim\":%d,\"n_tokens\":%lld,\"dtype\":\"%s\",\"window\":%d,\"n_sinks\":%d,"
                "\"n_clustered\":%lld,\"fine_ratio\":%.6g,\"coarse_ratio\":%.6g,\"kmeans_iters\":%d,\"seed\":%llu,"
                "\"calibration_queries\":%d,\"kv_bytes\":%llu,\"index_bytes\":%llu,\"bytes_on_disk\":%llu,"
                "\"build_seconds\":%.3f,\"created_unix\":%lld,",
                JsonEscape(i.name).c_str(), static_cast<unsigned long long>(i.id), JsonEscape(i.model).c_str(),
                i.n_layers, i.n_q_heads, i.n_kv_heads, i.head_dim, static_cast<long long>(i.n_tokens),
                DTypeName(i.dtype), i.window, i.n_sinks, static_cast<long long>(i.n_clustered), i.fine_ratio,
                i.coarse_ratio, i.kmeans_iters, static_cast<unsigned long long>(i.seed), i.calibration_queries,
                static_cast<unsigned long long>(i.kv_bytes), static_cast<unsigned long long>(i.index_bytes),
                static_cast<unsigned long long>(i.bytes_on_disk), i.build_seconds,
                static_cast<long long>(i.created_unix));
  return std::string(buf) + "\"fine_clusters\":" + arr(i.fine_clusters) + ",\"coarse_clusters\":" +
         arr(i.coarse_clusters) + ",\"thresholds\":" + th + "}\n";
}

}  // namespace sqz::cli
