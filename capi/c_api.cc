// The C API (include/sqz/c.h): each function converts its C arguments,
// calls the C++ API and turns the Status into a code plus the thread's
// last-error message. Guard() is the one place where exceptions stop: no
// C++ exception may unwind into C (undefined behaviour, usually abort).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "sqz/build.h"
#include "sqz/c.h"
#include "sqz/db.h"
#include "sqz/kv_source.h"
#include "sqz/query.h"
#include "sqz/status.h"
#include "sqz/types.h"

// The handles. A context holds a reference to its database so that C
// callers (and garbage-collected languages, which finalise in any order) may
// close the database first: sqz::ContextHandle requires the DB to outlive it.
struct sqz_db {
  std::shared_ptr<sqz::DB> db;
};
struct sqz_context {
  std::shared_ptr<sqz::DB> db;  // declared first: destroyed after the handle
  std::unique_ptr<sqz::ContextHandle> handle;
};

namespace {

using sqz::Status;

// The C codes are the C++ codes (c.h promises it).
static_assert(SQZ_OK == static_cast<int>(Status::Code::kOk));
static_assert(SQZ_NOT_FOUND == static_cast<int>(Status::Code::kNotFound));
static_assert(SQZ_CORRUPTION == static_cast<int>(Status::Code::kCorruption));
static_assert(SQZ_INVALID_ARGUMENT == static_cast<int>(Status::Code::kInvalidArgument));
static_assert(SQZ_IO_ERROR == static_cast<int>(Status::Code::kIOError));
static_assert(SQZ_ALREADY_EXISTS == static_cast<int>(Status::Code::kAlreadyExists));
static_assert(SQZ_NOT_SUPPORTED == static_cast<int>(Status::Code::kNotSupported));
static_assert(SQZ_ABORTED == static_cast<int>(Status::Code::kAborted));
static_assert(SQZ_DTYPE_F32 == static_cast<int>(sqz::DType::kF32) &&
              SQZ_DTYPE_F16 == static_cast<int>(sqz::DType::kF16) &&
              SQZ_DTYPE_BF16 == static_cast<int>(sqz::DType::kBF16));
static_assert(SQZ_MODE_DENSE == static_cast<int>(sqz::SelectionMode::kDense) &&
              SQZ_MODE_BUDGET == static_cast<int>(sqz::SelectionMode::kBudget) &&
              SQZ_MODE_THRESHOLD == static_cast<int>(sqz::SelectionMode::kThreshold));
static_assert(SQZ_GQA_UNION == static_cast<int>(sqz::GqaPolicy::kUnion) &&
              SQZ_GQA_PER_HEAD == static_cast<int>(sqz::GqaPolicy::kPerHead));
static_assert(SQZ_DEVICE_CPU == static_cast<int>(sqz::Device::kCpu) &&
              SQZ_DEVICE_CUDA == static_cast<int>(sqz::Device::kCuda));
static_assert(SQZ_RESIDENCY_STORAGE == static_cast<int>(sqz::Residency::kStorage) &&
              SQZ_RESIDENCY_DEVICE == static_cast<int>(sqz::Residency::kDevice));

// A fixed buffer, not a std::string: reporting an allocation failure must
// not allocate.
constexpr size_t kErrorBytes = 8192;
thread_local char t_error[kErrorBytes];

void SetError(std::initializer_list<std::string_view> parts) {
  size_t n = 0;
  for (std::string_view p : parts) {
    const size_t k = std::min(p.size(), kErrorBytes - 1 - n);
    std::memcpy(t_error + n, p.data(), k);
    n += k;
  }
  t_error[n] = '\0';
}

int Report(const Status& s) {
  if (s.ok()) return SQZ_OK;
  SetError({sqz::StatusCodeName(s.code()), ": ", s.message()});
  return static_cast<int>(s.code());
}

// Runs body(fn) -> Status so that no exception leaves the C API; `fn` (the
// C function's name) prefixes the messages this file writes itself.
template <class Body>
int Guard(const char* fn, Body&& body) noexcept {
  try {
    return Report(body(fn));
  } catch (const std::bad_alloc&) {
    SetError({"OutOfMemory: ", fn, ": an allocation failed; nothing was returned"});
    return SQZ_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    SetError({"Internal: ", fn, ": unexpected exception: ", e.what()});
    return SQZ_INTERNAL;
  } catch (...) {
    SetError({"Internal: ", fn, ": unexpected exception of unknown type"});
    return SQZ_INTERNAL;
  }
}

Status Null(const char* fn, const char* arg) {
  return Status::InvalidArgument(std::string(fn) + ": " + arg + " is NULL");
}

// An enum field of a C struct: any int can arrive, and a cast to the C++
// uint8_t enum would wrap (256 would read as 0).
Status CheckEnum(const char* fn, const char* field, int value, int max) {
  if (value >= 0 && value <= max) return Status::OK();
  return Status::InvalidArgument(std::string(fn) + ": " + field + " = " + std::to_string(value) +
                                 " is not a valid value (0.." + std::to_string(max) + ")");
}

// malloc'd copy (released with free() by the sqz_*_free functions).
char* CopyString(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (!p) throw std::bad_alloc();
  std::memcpy(p, s.data(), s.size() + 1);
  return p;
}

void FillInfo(const sqz::ContextInfo& ci, sqz_context_info* out) {
  sqz_context_info r{};
  try {
    r.name = CopyString(ci.name);
    r.model = CopyString(ci.model);
    r.damage = CopyString(ci.damage);
    if (!ci.thresholds.empty()) {
      r.thresholds = static_cast<sqz_threshold*>(std::calloc(ci.thresholds.size(), sizeof(sqz_threshold)));
      if (!r.thresholds) throw std::bad_alloc();
      r.n_thresholds = ci.thresholds.size();
      for (size_t i = 0; i < ci.thresholds.size(); ++i) {
        r.thresholds[i] = {ci.thresholds[i].quantile, ci.thresholds[i].flat, ci.thresholds[i].coarse,
                           ci.thresholds[i].fine};
      }
    }
  } catch (...) {
    sqz_context_info_free(&r);
    throw;
  }
  r.id = ci.id;
  r.format_version = ci.format_version;
  r.n_layers = ci.n_layers;
  r.n_kv_heads = ci.n_kv_heads;
  r.n_q_heads = ci.n_q_heads;
  r.head_dim = ci.head_dim;
  r.n_tokens = ci.n_tokens;
  r.dtype = static_cast<int>(ci.dtype);
  r.window = ci.window;
  r.n_sinks = ci.n_sinks;
  r.n_clustered = ci.n_clustered;
  r.fine_ratio = ci.fine_ratio;
  r.coarse_ratio = ci.coarse_ratio;
  r.kmeans_iters = ci.kmeans_iters;
  r.seed = ci.seed;
  r.calibration_queries = ci.calibration_queries;
  r.page_rows = ci.page_rows;
  r.clustered_pages = ci.clustered_pages;
  r.always_pages = ci.always_pages;
  r.kv_bytes = ci.kv_bytes;
  r.index_bytes = ci.index_bytes;
  r.bytes_on_disk = ci.bytes_on_disk;
  r.build_seconds = ci.build_seconds;
  r.created_unix = ci.created_unix;
  *out = r;
}

sqz::BuildOptions ToBuildOptions(const sqz_build_options* in) {
  sqz::BuildOptions o;
  if (in) {
    o.window = in->window;
    o.n_sinks = in->n_sinks;
    o.fine_ratio = in->fine_ratio;
    o.coarse_ratio = in->coarse_ratio;
    o.page_rows = in->page_rows;
    o.kmeans_iters = in->kmeans_iters;
    o.seed = in->seed;
    o.replace = in->replace != 0;
    o.read_ahead = in->read_ahead != 0;
  }
  return o;
}

void FillBuildStats(const sqz::BuildStats& s, sqz_build_stats* out) {
  if (!out) return;
  *out = {s.seconds_total,  s.seconds_read, s.seconds_kmeans, s.seconds_calibrate, s.seconds_write,
          s.keys_clustered, s.kv_bytes,     s.index_bytes,    s.peak_rss_bytes};
}

// Builds from `source` into *db; the common tail of both build functions.
Status Build(sqz_db* db, const char* name, sqz::KvSource* source, const sqz_build_options* options,
             sqz_build_stats* stats) {
  sqz::BuildStats st;
  SQZ_RETURN_IF_ERROR(sqz::BuildContext(db->db.get(), name, source, ToBuildOptions(options), &st));
  FillBuildStats(st, stats);
  return Status::OK();
}

}  // namespace

extern "C" {

const char* sqz_last_error(void) { return t_error; }

const char* sqz_status_name(int code) {
  switch (code) {
    case SQZ_OK:
    case SQZ_NOT_FOUND:
    case SQZ_CORRUPTION:
    case SQZ_INVALID_ARGUMENT:
    case SQZ_IO_ERROR:
    case SQZ_ALREADY_EXISTS:
    case SQZ_NOT_SUPPORTED:
    case SQZ_ABORTED:
      return sqz::StatusCodeName(static_cast<Status::Code>(code));
    case SQZ_OUT_OF_MEMORY:
      return "OutOfMemory";
    case SQZ_INTERNAL:
      return "Internal";
    default:
      return "Unknown";
  }
}

const char* sqz_version(void) { return SQZ_VERSION_STRING; }

// ---------------------------------------------------------------------------
// Database
// ---------------------------------------------------------------------------

int sqz_db_options_init(sqz_db_options* options) {
  return Guard(__func__, [&](const char* fn) {
    if (!options) return Null(fn, "options");
    const sqz::Options d;
    *options = {d.create_if_missing ? 1 : 0, d.error_if_exists ? 1 : 0, d.read_only ? 1 : 0, d.block_cache_bytes,
                d.max_background_jobs};
    return Status::OK();
  });
}

int sqz_db_open(const char* path, const sqz_db_options* options, sqz_db** db) {
  return Guard(__func__, [&](const char* fn) {
    if (db) *db = nullptr;
    if (!path) return Null(fn, "path");
    if (!db) return Null(fn, "db");
    sqz::Options o;
    if (options) {
      o.create_if_missing = options->create_if_missing != 0;
      o.error_if_exists = options->error_if_exists != 0;
      o.read_only = options->read_only != 0;
      o.block_cache_bytes = options->block_cache_bytes;
      o.max_background_jobs = options->max_background_jobs;
    }
    std::unique_ptr<sqz::DB> opened;
    SQZ_RETURN_IF_ERROR(sqz::DB::Open(o, path, &opened));
    auto h = std::make_unique<sqz_db>();
    h->db = std::move(opened);
    *db = h.release();
    return Status::OK();
  });
}

void sqz_db_close(sqz_db* db) { delete db; }

int sqz_db_refresh(sqz_db* db) {
  return Guard(__func__, [&](const char* fn) {
    if (!db) return Null(fn, "db");
    return db->db->Refresh();
  });
}

int sqz_db_list_contexts(sqz_db* db, char*** names, size_t* count) {
  return Guard(__func__, [&](const char* fn) {
    if (names) *names = nullptr;
    if (!db) return Null(fn, "db");
    if (!names) return Null(fn, "names");
    std::vector<std::string> list;
    SQZ_RETURN_IF_ERROR(db->db->ListContexts(&list));
    char** arr = static_cast<char**>(std::calloc(list.size() + 1, sizeof(char*)));
    if (!arr) throw std::bad_alloc();
    try {
      for (size_t i = 0; i < list.size(); ++i) arr[i] = CopyString(list[i]);
    } catch (...) {
      sqz_names_free(arr);  // the entries not yet copied are NULL (calloc)
      throw;
    }
    *names = arr;
    if (count) *count = list.size();
    return Status::OK();
  });
}

void sqz_names_free(char** names) {
  if (!names) return;
  for (char** p = names; *p; ++p) std::free(*p);
  std::free(names);
}

int sqz_db_drop_context(sqz_db* db, const char* name) {
  return Guard(__func__, [&](const char* fn) {
    if (!db) return Null(fn, "db");
    if (!name) return Null(fn, "name");
    return db->db->DropContext(name);
  });
}

int sqz_db_verify_context(sqz_db* db, const char* name, sqz_verify_report* report) {
  return Guard(__func__, [&](const char* fn) {
    if (!db) return Null(fn, "db");
    if (!name) return Null(fn, "name");
    sqz::VerifyReport r;
    SQZ_RETURN_IF_ERROR(db->db->VerifyContext(name, &r));
    if (report) *report = {r.records_checked, r.kv_pages_checked, r.bytes_checked};
    return Status::OK();
  });
}

int sqz_db_backup(sqz_db* db, const char* backup_dir, uint32_t* backup_id) {
  return Guard(__func__, [&](const char* fn) {
    if (!db) return Null(fn, "db");
    if (!backup_dir) return Null(fn, "backup_dir");
    sqz::BackupInfo info;
    SQZ_RETURN_IF_ERROR(db->db->Backup(backup_dir, &info));
    if (backup_id) *backup_id = info.backup_id;
    return Status::OK();
  });
}

int sqz_restore(const char* backup_dir, uint32_t backup_id, const char* db_path) {
  return Guard(__func__, [&](const char* fn) {
    if (!backup_dir) return Null(fn, "backup_dir");
    if (!db_path) return Null(fn, "db_path");
    sqz::BackupInfo info;
    return sqz::DB::Restore(backup_dir, backup_id, db_path, &info);
  });
}

int sqz_db_describe_context(sqz_db* db, const char* name, sqz_context_info* info) {
  return Guard(__func__, [&](const char* fn) {
    if (info) *info = sqz_context_info{};
    if (!db) return Null(fn, "db");
    if (!name) return Null(fn, "name");
    if (!info) return Null(fn, "info");
    sqz::ContextInfo ci;
    SQZ_RETURN_IF_ERROR(db->db->DescribeContext(name, &ci));
    FillInfo(ci, info);
    return Status::OK();
  });
}

void sqz_context_info_free(sqz_context_info* info) {
  if (!info) return;
  std::free(info->name);
  std::free(info->model);
  std::free(info->damage);
  std::free(info->thresholds);
  *info = sqz_context_info{};
}

// ---------------------------------------------------------------------------
// Building
// ---------------------------------------------------------------------------

int sqz_build_options_init(sqz_build_options* options) {
  return Guard(__func__, [&](const char* fn) {
    if (!options) return Null(fn, "options");
    const sqz::BuildOptions d;
    *options = {d.window,       d.n_sinks, d.fine_ratio,      d.coarse_ratio,      d.page_rows,
                d.kmeans_iters, d.seed,    d.replace ? 1 : 0, d.read_ahead ? 1 : 0};
    return Status::OK();
  });
}

int sqz_build_context_from_file(sqz_db* db, const char* name, const char* kv_path, const sqz_build_options* options,
                                sqz_build_stats* stats) {
  return Guard(__func__, [&](const char* fn) {
    if (!db) return Null(fn, "db");
    if (!name) return Null(fn, "name");
    if (!kv_path) return Null(fn, "kv_path");
    std::unique_ptr<sqz::KvSource> source;
    SQZ_RETURN_IF_ERROR(sqz::OpenSafetensorsKvSource(kv_path, &source));
    return Build(db, name, source.get(), options, stats);
  });
}

int sqz_build_context_from_tensors(sqz_db* db, const char* name, const sqz_kv_tensors* kv,
                                   const sqz_build_options* options, sqz_build_stats* stats) {
  return Guard(__func__, [&](const char* fn) {
    if (!db) return Null(fn, "db");
    if (!name) return Null(fn, "name");
    if (!kv) return Null(fn, "kv");
    SQZ_RETURN_IF_ERROR(CheckEnum(fn, "kv->dtype", kv->dtype, SQZ_DTYPE_BF16));
    if (kv->n_layers < 1) {
      return Status::InvalidArgument(std::string(fn) + ": kv->n_layers = " + std::to_string(kv->n_layers) +
                                     " (a context has at least one layer)");
    }
    if (!kv->layers) return Null(fn, "kv->layers");
    const auto dtype = static_cast<sqz::DType>(kv->dtype);
    const std::vector<int64_t> kv_shape = {kv->n_kv_heads, kv->n_tokens, kv->head_dim};
    std::vector<sqz::KvLayerView> layers;
    layers.reserve(static_cast<size_t>(kv->n_layers));
    for (int i = 0; i < kv->n_layers; ++i) {
      const sqz_kv_layer& l = kv->layers[i];
      // A NULL k or v is named by the source's validation (with its layer).
      sqz::KvLayerView view;
      view.k = {l.k, dtype, kv_shape};
      view.v = {l.v, dtype, kv_shape};
      if (l.q_window) view.q_window = {l.q_window, sqz::DType::kF32, {kv->n_q_heads, kv->q_window_len, kv->head_dim}};
      layers.push_back(std::move(view));
    }
    std::unique_ptr<sqz::KvSource> source;
    SQZ_RETURN_IF_ERROR(
        sqz::MakeInMemoryKvSource(kv->n_q_heads, std::move(layers), kv->model ? kv->model : "", &source));
    return Build(db, name, source.get(), options, stats);
  });
}

// ---------------------------------------------------------------------------
// Querying
// ---------------------------------------------------------------------------

int sqz_open_options_init(sqz_open_options* options) {
  return Guard(__func__, [&](const char* fn) {
    if (!options) return Null(fn, "options");
    const sqz::OpenOptions d;
    *options = {static_cast<int>(d.device),    d.device_id,         d.kv_head_begin, d.kv_head_end,
                static_cast<int>(d.residency), d.device_cache_bytes};
    return Status::OK();
  });
}

int sqz_context_open(sqz_db* db, const char* name, const sqz_open_options* options, sqz_context** ctx) {
  return Guard(__func__, [&](const char* fn) {
    if (ctx) *ctx = nullptr;
    if (!db) return Null(fn, "db");
    if (!name) return Null(fn, "name");
    if (!ctx) return Null(fn, "ctx");
    sqz::OpenOptions o;
    if (options) {
      SQZ_RETURN_IF_ERROR(CheckEnum(fn, "options->device", options->device, SQZ_DEVICE_CUDA));
      SQZ_RETURN_IF_ERROR(CheckEnum(fn, "options->residency", options->residency, SQZ_RESIDENCY_DEVICE));
      o.device = static_cast<sqz::Device>(options->device);
      o.device_id = options->device_id;
      o.kv_head_begin = options->kv_head_begin;
      o.kv_head_end = options->kv_head_end;
      o.residency = static_cast<sqz::Residency>(options->residency);
      o.device_cache_bytes = options->device_cache_bytes;
    }
    auto h = std::make_unique<sqz_context>();
    SQZ_RETURN_IF_ERROR(sqz::ContextHandle::Open(db->db.get(), name, o, &h->handle));
    h->db = db->db;
    *ctx = h.release();
    return Status::OK();
  });
}

void sqz_context_close(sqz_context* ctx) { delete ctx; }

int sqz_context_describe(const sqz_context* ctx, sqz_context_info* info) {
  return Guard(__func__, [&](const char* fn) {
    if (info) *info = sqz_context_info{};
    if (!ctx) return Null(fn, "ctx");
    if (!info) return Null(fn, "info");
    FillInfo(ctx->handle->info(), info);
    return Status::OK();
  });
}

int sqz_context_heads(const sqz_context* ctx, int* kv_head_begin, int* kv_head_end, int* n_q_heads) {
  return Guard(__func__, [&](const char* fn) {
    if (!ctx) return Null(fn, "ctx");
    if (kv_head_begin) *kv_head_begin = ctx->handle->kv_head_begin();
    if (kv_head_end) *kv_head_end = ctx->handle->kv_head_end();
    if (n_q_heads) *n_q_heads = ctx->handle->n_served_q_heads();
    return Status::OK();
  });
}

int sqz_query_options_init(sqz_query_options* options) {
  return Guard(__func__, [&](const char* fn) {
    if (!options) return Null(fn, "options");
    const sqz::QueryOptions d;
    *options = {static_cast<int>(d.mode),
                d.budget,
                d.threshold_quantile,
                d.threshold,
                d.threshold_coarse,
                d.hierarchical ? 1 : 0,
                d.coarse_budget_factor,
                static_cast<int>(d.gqa),
                d.per_query_selection ? 1 : 0,
                d.softmax_scale};
    return Status::OK();
  });
}

int sqz_context_attend(const sqz_context* ctx, int layer, const float* q, int T, const sqz_query_options* options,
                       float* o, float* lse, sqz_attend_stats* stats) {
  return Guard(__func__, [&](const char* fn) {
    if (!ctx) return Null(fn, "ctx");
    if (!q) return Null(fn, "q");
    if (!o) return Null(fn, "o");
    if (!lse) return Null(fn, "lse");
    sqz::QueryOptions qo;
    if (options) {
      SQZ_RETURN_IF_ERROR(CheckEnum(fn, "options->mode", options->mode, SQZ_MODE_THRESHOLD));
      SQZ_RETURN_IF_ERROR(CheckEnum(fn, "options->gqa", options->gqa, SQZ_GQA_PER_HEAD));
      qo.mode = static_cast<sqz::SelectionMode>(options->mode);
      qo.budget = options->budget;
      qo.threshold_quantile = options->threshold_quantile;
      qo.threshold = options->threshold;
      qo.threshold_coarse = options->threshold_coarse;
      qo.hierarchical = options->hierarchical != 0;
      qo.coarse_budget_factor = options->coarse_budget_factor;
      qo.gqa = static_cast<sqz::GqaPolicy>(options->gqa);
      qo.per_query_selection = options->per_query_selection != 0;
      qo.softmax_scale = options->softmax_scale;
    }
    sqz::AttendStats st;
    SQZ_RETURN_IF_ERROR(ctx->handle->Attend(layer, q, T, qo, o, lse, stats ? &st : nullptr));
    if (stats) {
      sqz_attend_stats r{};
      for (const sqz::HeadStats& h : st.heads) {
        r.keys_selected += h.keys_selected;
        r.keys_attended += h.keys_attended;
        r.clusters_scored += h.clusters_scored;
        r.clusters_selected += h.clusters_selected;
        r.segments_read += h.segments_read;
        r.pages_read += h.pages_read;
        r.bytes_read += h.bytes_read;
      }
      r.seconds_score = st.seconds_score;
      r.seconds_read = st.seconds_read;
      r.seconds_attend = st.seconds_attend;
      *stats = r;
    }
    return Status::OK();
  });
}

int sqz_merge_attention_states(float* o_a, float* lse_a, const float* o_b, const float* lse_b, int64_t n,
                               int head_dim) {
  return Guard(__func__, [&](const char* fn) {
    if (n < 0) return Status::InvalidArgument(std::string(fn) + ": n = " + std::to_string(n) + " is negative");
    if (head_dim < 1) {
      return Status::InvalidArgument(std::string(fn) + ": head_dim = " + std::to_string(head_dim) + " (must be >= 1)");
    }
    if (n > 0) {
      if (!o_a) return Null(fn, "o_a");
      if (!lse_a) return Null(fn, "lse_a");
      if (!o_b) return Null(fn, "o_b");
      if (!lse_b) return Null(fn, "lse_b");
    }
    sqz::MergeAttentionStates(o_a, lse_a, o_b, lse_b, n, head_dim);
    return Status::OK();
  });
}

}  // extern "C"
