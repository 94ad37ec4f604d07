/* The squeeze C API: the database, building and querying contexts, from C
 * (and from any language with a C foreign-function interface).
 *
 * It wraps the C++ API (sqz/db.h, sqz/build.h, sqz/query.h) one call for one
 * call; those headers and docs/SEMANTICS.md define what each call computes.
 * This header is plain C11 and also compiles as C++.
 *
 * Errors (FAISS's convention). Every function that can fail returns an int
 * status code: SQZ_OK (0) on success, otherwise one of enum sqz_status_code.
 * The codes SQZ_NOT_FOUND .. SQZ_ABORTED are those of sqz::Status::Code, with
 * the same meaning; SQZ_OUT_OF_MEMORY and SQZ_INTERNAL report a C++ exception
 * caught at this boundary (no exception ever leaves a function of this
 * header). After a failing call, sqz_last_error() returns its message. A NULL
 * pointer where a value is required, or an enum field out of range, gives
 * SQZ_INVALID_ARGUMENT naming the function and the argument; it never crashes.
 * Sizes of the arrays behind pointers cannot be checked: a too-short array is
 * undefined behaviour, as for memcpy.
 *
 * Out-parameters are written only on success unless stated otherwise.
 *
 * Ownership. sqz_db and sqz_context are opaque handles created by
 * sqz_db_open / sqz_context_open and released by sqz_db_close /
 * sqz_context_close. A context keeps its database alive: sqz_db_close may be
 * called while contexts opened on it are still open; the database then
 * closes when the last of them does. Memory returned by the library (names,
 * strings in sqz_context_info) is released with the matching sqz_*_free
 * function, never with free(). Memory passed in (paths, tensors) is borrowed
 * for the duration of the call only.
 *
 * Thread-safety. Any function may be called from any thread. One sqz_db may
 * be used by many threads at once; so may one sqz_context (its version of the
 * context is fixed at open). Closing a handle must not race with another call
 * on it. The last-error message is per thread.
 *
 * Processes: one process at a time may open a directory read-write; any
 * number may open it read-only beside it (sqz/db.h, "Processes").
 */
#ifndef SQZ_C_H_
#define SQZ_C_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------
 * Status codes, errors, version
 * ------------------------------------------------------------------------ */

enum sqz_status_code {
  SQZ_OK = 0,
  SQZ_NOT_FOUND = 1,        /* no such context or database */
  SQZ_CORRUPTION = 2,       /* stored data or an input file failed its checks */
  SQZ_INVALID_ARGUMENT = 3, /* a bad argument or input value (NULL, range, NaN, shape) */
  SQZ_IO_ERROR = 4,         /* the file system or RocksDB failed (including a missing input file) */
  SQZ_ALREADY_EXISTS = 5,   /* a context of that name exists (and replace was not asked) */
  SQZ_NOT_SUPPORTED = 6,    /* not in this build or mode (CUDA, writes on a read-only database) */
  SQZ_ABORTED = 7,          /* a build stopped (e.g. out of memory inside the builder) */
  /* Not sqz::Status codes: a C++ exception caught at this boundary. */
  SQZ_OUT_OF_MEMORY = 100, /* std::bad_alloc */
  SQZ_INTERNAL = 101       /* any other exception (a bug: please report the message) */
};

/* The message of the last call on this thread that failed:
 * "<code name>: <message>" (sqz::Status::ToString, e.g. "NotFound: ..."),
 * "" if none has failed yet. Successful calls leave it unchanged. The pointer
 * stays valid until the next failing call on this thread; the message is
 * truncated to 8191 bytes. Never NULL. */
const char* sqz_last_error(void);

/* The name of a status code ("OK", "NotFound", ..., "OutOfMemory",
 * "Internal"; "Unknown" for any other value). Never NULL; static storage. */
const char* sqz_status_name(int code);

/* The library version, "major.minor.patch" (static storage). */
const char* sqz_version(void);

/* ------------------------------------------------------------------------
 * Database
 * ------------------------------------------------------------------------ */

typedef struct sqz_db sqz_db;

/* sqz::Options. Boolean fields: 0 = false, anything else = true. */
typedef struct sqz_db_options {
  int create_if_missing;    /* create the directory and an empty database when none exists (default 1) */
  int error_if_exists;      /* fail with SQZ_ALREADY_EXISTS if a database exists (default 0) */
  int read_only;            /* no lock, no writes; the view is fixed at open, sqz_db_refresh moves it (default 0) */
  size_t block_cache_bytes; /* RocksDB block cache (default 512 MiB) */
  int max_background_jobs;  /* flush/compaction threads (default 2) */
} sqz_db_options;

/* Fills *options with the defaults above. SQZ_INVALID_ARGUMENT if NULL. */
int sqz_db_options_init(sqz_db_options* options);

/* Opens (or creates, per options) the database at directory `path`;
 * options NULL = defaults. On success *db is a new handle (close it with
 * sqz_db_close); on failure *db is set to NULL. Errors: SQZ_NOT_FOUND (no
 * database and not creating one, or read_only), SQZ_ALREADY_EXISTS
 * (error_if_exists), SQZ_INVALID_ARGUMENT (`path` is a file, or a directory
 * holding files that are not a squeeze database: nothing is created over
 * them), SQZ_IO_ERROR (another process holds it read-write), SQZ_CORRUPTION,
 * SQZ_NOT_SUPPORTED (a newer format version). */
int sqz_db_open(const char* path, const sqz_db_options* options, sqz_db** db);

/* Releases the handle (NULL is a no-op). The database closes once no context
 * opened on it is open any more. */
void sqz_db_close(sqz_db* db);

/* Read-only database: moves its view forward to what the writer has
 * committed now. Read-write: no-op. Contexts already open keep their
 * version. */
int sqz_db_refresh(sqz_db* db);

/* The committed contexts' names, sorted. On success *names is a new array of
 * *count strings followed by a NULL entry (so `count` may be NULL), to be
 * released with sqz_names_free; on failure *names is NULL. */
int sqz_db_list_contexts(sqz_db* db, char*** names, size_t* count);

/* Releases an array from sqz_db_list_contexts (NULL is a no-op). */
void sqz_names_free(char** names);

/* Removes context `name` atomically (open contexts keep reading the version
 * they opened). Errors: SQZ_NOT_FOUND, SQZ_NOT_SUPPORTED (read-only). */
int sqz_db_drop_context(sqz_db* db, const char* name);

/* sqz::VerifyReport. */
typedef struct sqz_verify_report {
  int64_t records_checked;
  int64_t kv_pages_checked;
  uint64_t bytes_checked;
} sqz_verify_report;

/* Reads and checks every record of context `name` (checksums, record
 * validation, the permutation, a CRC32C per KV page). report may be NULL.
 * Errors: SQZ_NOT_FOUND, SQZ_CORRUPTION (naming the first bad record),
 * SQZ_IO_ERROR. */
int sqz_db_verify_context(sqz_db* db, const char* name, sqz_verify_report* report);

/* Writes a consistent, re-verified copy of the database into `backup_dir`
 * (created if missing; an existing one gets one more backup). *backup_id
 * (may be NULL) receives the new backup's id (1, 2, ...). Errors:
 * SQZ_NOT_SUPPORTED (read-only database), SQZ_IO_ERROR. */
int sqz_db_backup(sqz_db* db, const char* backup_dir, uint32_t* backup_id);

/* Restores backup `backup_id` (0 = the latest) of `backup_dir` into
 * `db_path`, which must not exist or be empty, then verifies every context.
 * Errors: SQZ_NOT_FOUND (not a backup directory, or no such backup),
 * SQZ_INVALID_ARGUMENT (db_path holds files), SQZ_CORRUPTION (a damaged
 * backup), SQZ_IO_ERROR. */
int sqz_restore(const char* backup_dir, uint32_t backup_id, const char* db_path);

/* ------------------------------------------------------------------------
 * Describing a context
 * ------------------------------------------------------------------------ */

/* Element types of stored keys and values (sqz::DType; on-disk values). */
enum sqz_dtype { SQZ_DTYPE_F32 = 0, SQZ_DTYPE_F16 = 1, SQZ_DTYPE_BF16 = 2 };

/* One calibrated threshold (sqz::ThresholdInfo). */
typedef struct sqz_threshold {
  double quantile; /* the fraction f of keys the window queries would drop */
  float flat;      /* flat (fine-level) tau */
  float coarse;    /* hierarchical: coarse tau */
  float fine;      /* hierarchical: fine tau */
} sqz_threshold;

/* The scalar fields of sqz::ContextInfo (sqz/db.h documents each), plus the
 * name, the model string, the calibrated thresholds and the damage. The four
 * pointers are owned by the struct: release them with sqz_context_info_free. */
typedef struct sqz_context_info {
  char* name;
  char* model; /* free text from the KV source, may be "" */
  uint64_t id; /* generation: never reused within a database; a replace gets a new one */
  uint32_t format_version;
  int n_layers;
  int n_kv_heads;
  int n_q_heads;
  int head_dim;
  int64_t n_tokens;
  int dtype;           /* enum sqz_dtype: stored K and V */
  int window;          /* observation window used (tokens) */
  int n_sinks;         /* always-kept first tokens */
  int64_t n_clustered; /* n_tokens - window - n_sinks */
  double fine_ratio;
  double coarse_ratio;
  int kmeans_iters;
  uint64_t seed;
  int calibration_queries; /* window queries used for calibration; 0: not calibrated */
  size_t n_thresholds;
  sqz_threshold* thresholds; /* [n_thresholds], NULL when 0 */
  int page_rows;
  int64_t clustered_pages; /* per (layer, KV head) */
  int64_t always_pages;    /* per (layer, KV head) */
  uint64_t kv_bytes;       /* raw K+V bytes stored, padding included */
  uint64_t index_bytes;    /* raw bytes of the index records */
  uint64_t bytes_on_disk;  /* RocksDB's estimate */
  double build_seconds;
  int64_t created_unix;
  char* damage; /* "" for a healthy context; else what is wrong with its table files (a degraded open,
                   docs/RELIABILITY.md): reading it fails with SQZ_CORRUPTION, dropping it works */
} sqz_context_info;

/* Fills *info for context `name`. *info is overwritten, never freed: release
 * what a previous call put there first. On failure *info is zeroed (so
 * sqz_context_info_free on it is always safe). Errors: SQZ_NOT_FOUND. */
int sqz_db_describe_context(sqz_db* db, const char* name, sqz_context_info* info);

/* Releases what *info owns and zeroes it (NULL is a no-op). */
void sqz_context_info_free(sqz_context_info* info);

/* ------------------------------------------------------------------------
 * Building a context (sqz/build.h)
 * ------------------------------------------------------------------------ */

/* The main fields of sqz::BuildOptions (k-means runs on FAISS, the default
 * calibration quantiles are used). Boolean fields: 0 / non-zero. */
typedef struct sqz_build_options {
  int window;          /* last tokens always attended, not clustered (default 100) */
  int n_sinks;         /* first tokens always attended (default 4) */
  double fine_ratio;   /* fine clusters per clustered key (default 0.05) */
  double coarse_ratio; /* coarse clusters per clustered key (default 0.01) */
  int page_rows;       /* rows per KV page (default 16) */
  int kmeans_iters;    /* Lloyd iterations (default 10) */
  uint64_t seed;       /* k-means seed; a build is deterministic for a seed (default 1234) */
  int replace;         /* replace an existing context atomically (default 0: SQZ_ALREADY_EXISTS) */
  int read_ahead;      /* read the next layer on a second thread (default 1) */
} sqz_build_options;

/* Fills *options with the defaults above. SQZ_INVALID_ARGUMENT if NULL. */
int sqz_build_options_init(sqz_build_options* options);

/* sqz::BuildStats. */
typedef struct sqz_build_stats {
  double seconds_total;
  double seconds_read;
  double seconds_kmeans;
  double seconds_calibrate;
  double seconds_write;
  int64_t keys_clustered;
  uint64_t kv_bytes;
  uint64_t index_bytes;
  uint64_t peak_rss_bytes;
} sqz_build_stats;

/* Builds context `name` from a safetensors KV file (docs/FORMAT.md, "Input:
 * the KV file") and commits it. options NULL = defaults; stats may be NULL.
 * On any error the database is as before. Errors: SQZ_IO_ERROR (the file
 * cannot be opened or read), SQZ_INVALID_ARGUMENT / SQZ_CORRUPTION (a bad
 * file, bad options, NaN/Inf in K or V), SQZ_ALREADY_EXISTS,
 * SQZ_NOT_SUPPORTED (read-only database), SQZ_ABORTED. */
int sqz_build_context_from_file(sqz_db* db, const char* name, const char* kv_path, const sqz_build_options* options,
                                sqz_build_stats* stats);

/* One layer of an in-memory KV cache (row-major, contiguous). */
typedef struct sqz_kv_layer {
  const void* k;         /* [n_kv_heads, n_tokens, head_dim] of sqz_kv_tensors.dtype (post-RoPE keys) */
  const void* v;         /* [n_kv_heads, n_tokens, head_dim] of sqz_kv_tensors.dtype */
  const float* q_window; /* [n_q_heads, q_window_len, head_dim] float32 window queries, or NULL */
} sqz_kv_layer;

/* A KV cache held by the caller (sqz::MakeInMemoryKvSource). Window queries
 * (used to calibrate thresholds) are given for every layer or for none. */
typedef struct sqz_kv_tensors {
  int n_layers;
  int n_kv_heads;
  int n_q_heads; /* a multiple of n_kv_heads */
  int64_t n_tokens;
  int head_dim;
  int dtype;                  /* enum sqz_dtype of every k and v */
  const sqz_kv_layer* layers; /* [n_layers] */
  int q_window_len;           /* W of the window queries; 0 when q_window is NULL */
  const char* model;          /* free text stored with the context; NULL = "" */
} sqz_kv_tensors;

/* Builds context `name` from tensors in memory (read during the call only,
 * never copied whole). Same options, stats and errors as
 * sqz_build_context_from_file; SQZ_INVALID_ARGUMENT names the layer and
 * tensor of a bad shape, a missing pointer or a NaN/Inf value. */
int sqz_build_context_from_tensors(sqz_db* db, const char* name, const sqz_kv_tensors* kv,
                                   const sqz_build_options* options, sqz_build_stats* stats);

/* ------------------------------------------------------------------------
 * Querying a context (sqz/query.h)
 * ------------------------------------------------------------------------ */

typedef struct sqz_context sqz_context;

enum sqz_device { SQZ_DEVICE_CPU = 0, SQZ_DEVICE_CUDA = 1 };
enum sqz_residency { SQZ_RESIDENCY_STORAGE = 0, SQZ_RESIDENCY_DEVICE = 1 };

/* sqz::OpenOptions. */
typedef struct sqz_open_options {
  int device;    /* enum sqz_device (default CPU) */
  int device_id; /* CUDA device ordinal (default 0) */
  /* The KV heads served: [kv_head_begin, kv_head_end), -1 = up to n_kv_heads
   * (default: all). Attend's q / o / lse then cover only their query heads. */
  int kv_head_begin;
  int kv_head_end;
  int residency;             /* enum sqz_residency (default STORAGE) */
  size_t device_cache_bytes; /* CUDA: bytes of GPU memory for KV pages; 0 = every served page */
} sqz_open_options;

/* Fills *options with the defaults above. SQZ_INVALID_ARGUMENT if NULL. */
int sqz_open_options_init(sqz_open_options* options);

/* Opens context `name` as of now (one consistent version for the handle's
 * whole life) and loads the served heads' index; options NULL = defaults.
 * On failure *ctx is set to NULL. Errors: SQZ_NOT_FOUND, SQZ_INVALID_ARGUMENT
 * (bad head range), SQZ_NOT_SUPPORTED (CUDA in a build without it),
 * SQZ_CORRUPTION, SQZ_IO_ERROR. */
int sqz_context_open(sqz_db* db, const char* name, const sqz_open_options* options, sqz_context** ctx);

/* Releases the handle (NULL is a no-op). */
void sqz_context_close(sqz_context* ctx);

/* Fills *info with the version this handle reads (info->id is its
 * generation); *info is overwritten as by sqz_db_describe_context, and
 * zeroed on failure. Release with sqz_context_info_free. */
int sqz_context_describe(const sqz_context* ctx, sqz_context_info* info);

/* The served KV heads [*kv_head_begin, *kv_head_end) and the number of query
 * heads q / o / lse cover (*n_q_heads). Each out-pointer may be NULL. */
int sqz_context_heads(const sqz_context* ctx, int* kv_head_begin, int* kv_head_end, int* n_q_heads);

enum sqz_selection_mode {
  SQZ_MODE_DENSE = 0,    /* every key: exact dense attention */
  SQZ_MODE_BUDGET = 1,   /* clusters by decreasing estimated mass up to `budget` of the keys */
  SQZ_MODE_THRESHOLD = 2 /* clusters whose estimated per-key probability > tau */
};
enum sqz_gqa_policy { SQZ_GQA_UNION = 0, SQZ_GQA_PER_HEAD = 1 };

/* sqz::QueryOptions (sqz/query.h documents each field). */
typedef struct sqz_query_options {
  int mode;                    /* enum sqz_selection_mode (default BUDGET) */
  double budget;               /* fraction of clustered keys kept, (0, 1] (default 0.125) */
  double threshold_quantile;   /* >= 0: the calibrated tau at this quantile (default -1: explicit taus) */
  float threshold;             /* explicit flat / fine tau (default 0) */
  float threshold_coarse;      /* explicit coarse tau (default 0) */
  int hierarchical;            /* two-level lookup (default 0) */
  double coarse_budget_factor; /* budget mode, hierarchical (default 2.0) */
  int gqa;                     /* enum sqz_gqa_policy (default UNION) */
  int per_query_selection;     /* prefill: each query selects alone (default 0) */
  float softmax_scale;         /* 0 = 1/sqrt(head_dim) (default 0) */
} sqz_query_options;

/* Fills *options with the defaults above. SQZ_INVALID_ARGUMENT if NULL. */
int sqz_query_options_init(sqz_query_options* options);

/* Totals over the served KV heads of one attend (sqz::AttendStats). */
typedef struct sqz_attend_stats {
  int64_t keys_selected;     /* clustered keys read */
  int64_t keys_attended;     /* keys attended incl. window and sinks, summed over query heads and queries */
  int64_t clusters_scored;   /* centroid dot products per query */
  int64_t clusters_selected; /* fine clusters read */
  int64_t segments_read;
  int64_t pages_read;
  uint64_t bytes_read;  /* K+V bytes of the pages read */
  double seconds_score; /* stage times, summed over heads (thread-seconds) */
  double seconds_read;
  double seconds_attend;
} sqz_attend_stats;

/* Attention of queries q over one layer of the context.
 *   q:   [n_q_heads, T, head_dim] float32 (post-RoPE; n_q_heads from sqz_context_heads)
 *   o:   [n_q_heads, T, head_dim] float32, written
 *   lse: [n_q_heads, T] float32, written (natural log)
 * options NULL = defaults; stats may be NULL. Errors: SQZ_INVALID_ARGUMENT
 * (layer out of range, T < 1, NaN/Inf in q, scores overflowing float32,
 * options out of range, a threshold quantile the context lacks),
 * SQZ_IO_ERROR / SQZ_CORRUPTION from storage. On error o and lse are
 * unspecified. */
int sqz_context_attend(const sqz_context* ctx, int layer, const float* q, int T, const sqz_query_options* options,
                       float* o, float* lse, sqz_attend_stats* stats);

/* Merges attention state (o_b, lse_b) into (o_a, lse_a), in place:
 *   lse = log(e^lse_a + e^lse_b), o = (e^lse_a o_a + e^lse_b o_b) / e^lse.
 * o_*: [n, head_dim]; lse_*: [n]. An empty state has lse = -inf (its o is
 * ignored); two empty states give an empty state with o = 0.
 * Errors: SQZ_INVALID_ARGUMENT (NULL with n > 0, n < 0, head_dim < 1). */
int sqz_merge_attention_states(float* o_a, float* lse_a, const float* o_b, const float* lse_b, int64_t n, int head_dim);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* SQZ_C_H_ */
