/* Tests of the C API (include/sqz/c.h), written in C11 and compiled as C, so
 * the header is checked as a C header and the library is used the way a C
 * program (or a foreign-function interface) uses it.
 *
 *   capi_test CASE     runs one case (tests/CMakeLists.txt registers each);
 *   capi_test all      runs every case except "oom".
 * SQZ_CAPI_TEST_VERBOSE=1 prints the message of every expected error.
 *
 * The reference for attention is dense softmax attention computed here in
 * double precision over the exact values handed to the builder. A small
 * harness instead of GoogleTest keeps the test in C. */
#define _XOPEN_SOURCE 700 /* mkdtemp, nftw */

#include <ftw.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sqz/c.h"

/* ---------------------------------------------------------------------------
 * Harness
 * ------------------------------------------------------------------------- */

static int g_checks;
static int g_failures;

#define CHECK(cond)                                                            \
  do {                                                                         \
    ++g_checks;                                                                \
    if (!(cond)) {                                                             \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                            \
    }                                                                          \
  } while (0)

/* Counts a check that a call returned SQZ_OK; reports it otherwise.
 * Returns whether it did. */
static int check_ok(int rc, const char* expr, const char* file, int line) {
  ++g_checks;
  if (rc == SQZ_OK) return 1;
  fprintf(stderr, "%s:%d: %s returned %d (%s): %s\n", file, line, expr, rc, sqz_status_name(rc), sqz_last_error());
  ++g_failures;
  return 0;
}

#define CHECK_OK(expr) (void)check_ok((expr), #expr, __FILE__, __LINE__)
/* Also ends the case (returns from it) when the call failed. */
#define REQUIRE_OK(expr)                                      \
  do {                                                        \
    if (!check_ok((expr), #expr, __FILE__, __LINE__)) return; \
  } while (0)

/* The call fails with `code`, and this thread's last error is
 * "<code name>: ..." and contains `needle` (so it is this call's message,
 * not an earlier one's). */
#define CHECK_ERR(expr, code, needle) check_err((expr), (code), (needle), #expr, __FILE__, __LINE__)

static void check_err(int rc, int code, const char* needle, const char* expr, const char* file, int line) {
  const char* msg = sqz_last_error();
  const char* name = sqz_status_name(code);
  ++g_checks;
  if (getenv("SQZ_CAPI_TEST_VERBOSE")) printf("%s:%d: %s\n", file, line, msg);
  if (rc != code || msg == NULL || strncmp(msg, name, strlen(name)) != 0 || strncmp(msg + strlen(name), ": ", 2) != 0 ||
      strlen(msg) <= strlen(name) + 2 || (needle && strstr(msg, needle) == NULL)) {
    fprintf(stderr, "%s:%d: %s returned %d (%s), expected %d (%s) with a message containing '%s'; last error: '%s'\n",
            file, line, expr, rc, sqz_status_name(rc), code, name, needle ? needle : "", msg ? msg : "(null)");
    ++g_failures;
  }
}

/* A fresh directory under $TMPDIR (or /tmp), removed at exit. */
static char g_tmp[4096];

static int remove_entry(const char* path, const struct stat* st, int flag, struct FTW* ftw) {
  (void)st;
  (void)flag;
  (void)ftw;
  return remove(path);
}

static void remove_tmp(void) {
  if (g_tmp[0]) nftw(g_tmp, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void make_tmp(void) {
  const char* base = getenv("TMPDIR");
  snprintf(g_tmp, sizeof g_tmp, "%s/sqz_capi_XXXXXX", base && base[0] ? base : "/tmp");
  if (!mkdtemp(g_tmp)) {
    perror("mkdtemp");
    exit(2);
  }
  atexit(remove_tmp);
}

/* g_tmp/<name>, in one of a few rotating buffers. */
static const char* tmp_path(const char* name) {
  static char buf[8][4200];
  static int next;
  char* p = buf[next++ % 8];
  snprintf(p, sizeof buf[0], "%s/%s", g_tmp, name);
  return p;
}

/* ---------------------------------------------------------------------------
 * Test data: a seeded KV cache, its tensors for the builder, a safetensors
 * file, and dense attention in double precision.
 * ------------------------------------------------------------------------- */

typedef struct {
  uint64_t s;
} rng_t;

static uint64_t rng_next(rng_t* r) { /* splitmix64 */
  uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static double rng_gauss(rng_t* r) {                                  /* Box-Muller */
  const double u1 = ((double)(rng_next(r) >> 11) + 1.0) * 0x1.0p-53; /* (0, 1] */
  const double u2 = (double)(rng_next(r) >> 11) * 0x1.0p-53;
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* IEEE fp16 bits of v, which must be exactly representable (the generator
 * rounds to multiples of 2^-8 below 8 in magnitude: at most 11 significant
 * bits, all normal numbers), so there is no rounding to get wrong. */
static uint16_t f16_bits(float v) {
  if (v == 0.0f) return 0;
  const uint16_t sign = v < 0 ? 0x8000 : 0;
  int e;
  const double m = frexp(fabs((double)v), &e); /* |v| = m * 2^e, m in [0.5, 1) */
  const int exponent = e - 1 + 15;             /* |v| = (2m) * 2^(e-1), 2m in [1, 2) */
  const int mantissa = (int)((2.0 * m - 1.0) * 1024.0);
  return (uint16_t)(sign | (exponent << 10) | mantissa);
}

enum { kLayers = 2, kKvHeads = 2, kQHeads = 4, kDim = 16, kTokens = 640, kQWindow = 16, kWindow = 32, kSinks = 4 };
#define kGroup (kQHeads / kKvHeads)
#define kPerLayer ((size_t)kKvHeads * kTokens * kDim)

typedef struct {
  int dtype;
  float* k[kLayers]; /* the exact values stored, [n_kv_heads, n_tokens, head_dim] */
  float* v[kLayers];
  void* k_in[kLayers]; /* what the builder is given: float or fp16 bits */
  void* v_in[kLayers];
  float* q_window[kLayers]; /* [n_q_heads, kQWindow, head_dim] or NULL */
  sqz_kv_layer layers[kLayers];
  sqz_kv_tensors tensors;
} kv_data;

static void kv_make(kv_data* kv, uint64_t seed, int dtype, int with_q_window) {
  rng_t r = {seed};
  memset(kv, 0, sizeof *kv);
  kv->dtype = dtype;
  for (int l = 0; l < kLayers; ++l) {
    kv->k[l] = malloc(kPerLayer * sizeof(float));
    kv->v[l] = malloc(kPerLayer * sizeof(float));
    for (size_t i = 0; i < kPerLayer; ++i) {
      double a = rng_gauss(&r), b = rng_gauss(&r);
      if (dtype == SQZ_DTYPE_F16) { /* exactly representable in fp16 (f16_bits) */
        a = fmax(-7.99, fmin(7.99, round(a * 256.0) / 256.0));
        b = fmax(-7.99, fmin(7.99, round(b * 256.0) / 256.0));
      }
      kv->k[l][i] = (float)a;
      kv->v[l][i] = (float)b;
    }
    if (dtype == SQZ_DTYPE_F16) {
      uint16_t* k16 = malloc(kPerLayer * sizeof(uint16_t));
      uint16_t* v16 = malloc(kPerLayer * sizeof(uint16_t));
      for (size_t i = 0; i < kPerLayer; ++i) {
        k16[i] = f16_bits(kv->k[l][i]);
        v16[i] = f16_bits(kv->v[l][i]);
      }
      kv->k_in[l] = k16;
      kv->v_in[l] = v16;
    } else {
      kv->k_in[l] = kv->k[l];
      kv->v_in[l] = kv->v[l];
    }
    if (with_q_window) {
      const size_t n = (size_t)kQHeads * kQWindow * kDim;
      kv->q_window[l] = malloc(n * sizeof(float));
      for (size_t i = 0; i < n; ++i) kv->q_window[l][i] = (float)rng_gauss(&r);
    }
    kv->layers[l].k = kv->k_in[l];
    kv->layers[l].v = kv->v_in[l];
    kv->layers[l].q_window = kv->q_window[l];
  }
  kv->tensors.n_layers = kLayers;
  kv->tensors.n_kv_heads = kKvHeads;
  kv->tensors.n_q_heads = kQHeads;
  kv->tensors.n_tokens = kTokens;
  kv->tensors.head_dim = kDim;
  kv->tensors.dtype = dtype;
  kv->tensors.layers = kv->layers;
  kv->tensors.q_window_len = with_q_window ? kQWindow : 0;
  kv->tensors.model = dtype == SQZ_DTYPE_F16 ? "synthetic f16" : "synthetic f32";
}

static void kv_free(kv_data* kv) {
  for (int l = 0; l < kLayers; ++l) {
    if (kv->k_in[l] != kv->k[l]) free(kv->k_in[l]);
    if (kv->v_in[l] != kv->v[l]) free(kv->v_in[l]);
    free(kv->k[l]);
    free(kv->v[l]);
    free(kv->q_window[l]);
  }
  memset(kv, 0, sizeof *kv);
}

/* Fast builds: few k-means iterations; the window and sinks fixed so the
 * expected n_clustered is known. */
static sqz_build_options build_options(void) {
  sqz_build_options o;
  sqz_build_options_init(&o);
  o.window = kWindow;
  o.n_sinks = kSinks;
  o.kmeans_iters = 4;
  o.seed = 7;
  return o;
}

/* Builds `name` into db from kv; returns 0 when it failed (reported). */
static int build(sqz_db* db, const char* name, const kv_data* kv) {
  const sqz_build_options o = build_options();
  return check_ok(sqz_build_context_from_tensors(db, name, &kv->tensors, &o, NULL), "sqz_build_context_from_tensors",
                  __FILE__, __LINE__);
}

static float* random_queries(uint64_t seed, size_t n) {
  rng_t r = {seed};
  float* q = malloc(n * sizeof(float));
  for (size_t i = 0; i < n; ++i) q[i] = (float)rng_gauss(&r);
  return q;
}

/* Dense attention of query heads [h0, h0 + nh) over every token of `layer`,
 * in double precision: o [nh, T, d], lse [nh, T]. */
static void dense_reference(const kv_data* kv, int layer, int h0, int nh, const float* q, int T, double scale,
                            double* o, double* lse) {
  double* s = malloc(kTokens * sizeof(double));
  for (int i = 0; i < nh; ++i) {
    const int g = (h0 + i) / kGroup;
    const float* K = kv->k[layer] + (size_t)g * kTokens * kDim;
    const float* V = kv->v[layer] + (size_t)g * kTokens * kDim;
    for (int t = 0; t < T; ++t) {
      const float* qr = q + ((size_t)i * T + t) * kDim;
      double m = -INFINITY, z = 0;
      for (int j = 0; j < kTokens; ++j) {
        double dot = 0;
        for (int c = 0; c < kDim; ++c) dot += (double)qr[c] * K[(size_t)j * kDim + c];
        s[j] = dot * scale;
        if (s[j] > m) m = s[j];
      }
      double* orow = o + ((size_t)i * T + t) * kDim;
      for (int c = 0; c < kDim; ++c) orow[c] = 0;
      for (int j = 0; j < kTokens; ++j) {
        const double p = exp(s[j] - m);
        z += p;
        for (int c = 0; c < kDim; ++c) orow[c] += p * V[(size_t)j * kDim + c];
      }
      for (int c = 0; c < kDim; ++c) orow[c] /= z;
      lse[(size_t)i * T + t] = m + log(z);
    }
  }
  free(s);
}

/* Largest relative error of (o, lse) against the reference: per row of O
 * relative to the row's largest magnitude, LSE relative to max(1, |lse|). */
static double max_rel_error(const float* o, const float* lse, const double* ro, const double* rlse, int rows) {
  double worst = 0;
  for (int r = 0; r < rows; ++r) {
    double scale = 1e-30, err = 0;
    for (int c = 0; c < kDim; ++c) scale = fmax(scale, fabs(ro[(size_t)r * kDim + c]));
    for (int c = 0; c < kDim; ++c) err = fmax(err, fabs(o[(size_t)r * kDim + c] - ro[(size_t)r * kDim + c]));
    worst = fmax(worst, err / scale);
    worst = fmax(worst, fabs(lse[r] - rlse[r]) / fmax(1.0, fabs(rlse[r])));
    if (!isfinite(o[(size_t)r * kDim]) || !isfinite(lse[r])) return INFINITY;
  }
  return worst;
}

/* Attends `layer` densely through ctx (serving query heads [h0, h0 + nh))
 * and returns the largest relative error against dense_reference. */
static double dense_error(const sqz_context* ctx, const kv_data* kv, int layer, int h0, int nh, int T, float scale,
                          uint64_t seed) {
  const size_t rows = (size_t)nh * T;
  float* q = random_queries(seed, rows * kDim);
  float* o = malloc(rows * kDim * sizeof(float));
  float* lse = malloc(rows * sizeof(float));
  double* ro = malloc(rows * kDim * sizeof(double));
  double* rlse = malloc(rows * sizeof(double));
  sqz_query_options qo;
  sqz_query_options_init(&qo);
  qo.mode = SQZ_MODE_DENSE;
  qo.softmax_scale = scale;
  double err = INFINITY;
  const int rc = sqz_context_attend(ctx, layer, q, T, &qo, o, lse, NULL);
  if (rc == SQZ_OK) {
    dense_reference(kv, layer, h0, nh, q, T, scale > 0 ? scale : 1.0 / sqrt((double)kDim), ro, rlse);
    err = max_rel_error(o, lse, ro, rlse, (int)rows);
  } else {
    fprintf(stderr, "dense attend failed (%d): %s\n", rc, sqz_last_error());
  }
  free(q);
  free(o);
  free(lse);
  free(ro);
  free(rlse);
  return err;
}

/* A safetensors KV file (docs/FORMAT.md, "Input: the KV file") of kv's
 * float32 values. Returns 0 on an I/O error. */
static int write_kv_file(const char* path, const kv_data* kv, const char* model) {
  char header[8192];
  int n = snprintf(header, sizeof header, "{\"__metadata__\":{\"n_q_heads\":\"%d\",\"model\":\"%s\"}", kQHeads, model);
  const size_t bytes = kPerLayer * sizeof(float);
  size_t off = 0;
  for (int l = 0; l < kLayers; ++l) {
    for (int j = 0; j < 2; ++j) {
      n += snprintf(header + n, sizeof header - (size_t)n,
                    ",\"layers.%d.%s\":{\"dtype\":\"F32\",\"shape\":[%d,%d,%d],\"data_offsets\":[%zu,%zu]}", l,
                    j ? "v" : "k", kKvHeads, kTokens, kDim, off, off + bytes);
      off += bytes;
    }
  }
  n += snprintf(header + n, sizeof header - (size_t)n, "}");
  while (n % 8) header[n++] = ' '; /* the data starts 8-byte aligned */
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = (unsigned char)((uint64_t)n >> (8 * i)); /* little-endian u64 */
  FILE* f = fopen(path, "wb");
  if (!f) return 0;
  int ok = fwrite(len, 1, 8, f) == 8 && fwrite(header, 1, (size_t)n, f) == (size_t)n;
  for (int l = 0; l < kLayers && ok; ++l) {
    ok = fwrite(kv->k[l], sizeof(float), kPerLayer, f) == kPerLayer &&
         fwrite(kv->v[l], sizeof(float), kPerLayer, f) == kPerLayer;
  }
  return fclose(f) == 0 && ok;
}

static sqz_db* open_db(const char* path, int read_only) {
  sqz_db_options o;
  sqz_db_options_init(&o);
  o.read_only = read_only;
  o.block_cache_bytes = (size_t)16 << 20;
  sqz_db* db = NULL;
  check_ok(sqz_db_open(path, &o, &db), "sqz_db_open", __FILE__, __LINE__);
  return db;
}

/* A new database g_tmp/<db_file> holding context `name`, built from
 * kv_make(kv, seed, dtype, q_window); NULL when that failed (reported). */
static sqz_db* db_with_context(const char* db_file, const char* name, kv_data* kv, uint64_t seed, int dtype,
                               int q_window) {
  kv_make(kv, seed, dtype, q_window);
  sqz_db* db = open_db(tmp_path(db_file), 0);
  if (db && !build(db, name, kv)) {
    sqz_db_close(db);
    db = NULL;
  }
  return db;
}

/* ---------------------------------------------------------------------------
 * Cases
 * ------------------------------------------------------------------------- */

/* Build from tensors (float32 with window queries, fp16 without), list,
 * describe, verify, replace, drop. */
static void case_catalog(void) {
  sqz_db* db = open_db(tmp_path("catalog.db"), 0);
  if (!db) return;
  kv_data f32, f16;
  kv_make(&f32, 1, SQZ_DTYPE_F32, 1);
  kv_make(&f16, 2, SQZ_DTYPE_F16, 0);
  sqz_build_stats st;
  memset(&st, 0xff, sizeof st);
  const sqz_build_options bo = build_options();
  CHECK_OK(sqz_build_context_from_tensors(db, "ctx_f32", &f32.tensors, &bo, &st));
  CHECK(st.keys_clustered == (int64_t)kLayers * kKvHeads * (kTokens - kWindow - kSinks));
  CHECK(st.kv_bytes > 0 && st.index_bytes > 0 && st.seconds_total >= 0);
  CHECK(build(db, "ctx_f16", &f16));

  char** names = NULL;
  size_t count = 99;
  CHECK_OK(sqz_db_list_contexts(db, &names, &count));
  CHECK(count == 2);
  CHECK(names && names[0] && strcmp(names[0], "ctx_f16") == 0); /* sorted */
  CHECK(names && names[1] && strcmp(names[1], "ctx_f32") == 0);
  CHECK(names && names[2] == NULL);
  sqz_names_free(names);
  names = NULL;
  CHECK_OK(sqz_db_list_contexts(db, &names, NULL)); /* count is optional: the array ends with NULL */
  CHECK(names && names[0] && names[1] && !names[2]);
  sqz_names_free(names);

  sqz_context_info a, b;
  CHECK_OK(sqz_db_describe_context(db, "ctx_f32", &a));
  CHECK(a.name && strcmp(a.name, "ctx_f32") == 0);
  CHECK(a.model && strcmp(a.model, "synthetic f32") == 0);
  CHECK(a.n_layers == kLayers && a.n_kv_heads == kKvHeads && a.n_q_heads == kQHeads && a.head_dim == kDim);
  CHECK(a.n_tokens == kTokens && a.dtype == SQZ_DTYPE_F32);
  CHECK(a.window == kWindow && a.n_sinks == kSinks && a.n_clustered == kTokens - kWindow - kSinks);
  CHECK(a.kmeans_iters == 4 && a.seed == 7 && a.fine_ratio == bo.fine_ratio && a.coarse_ratio == bo.coarse_ratio);
  CHECK(a.page_rows == bo.page_rows);
  CHECK(a.clustered_pages == (a.n_clustered + a.page_rows - 1) / a.page_rows);
  CHECK(a.always_pages == (kWindow + kSinks + a.page_rows - 1) / a.page_rows);
  CHECK(a.calibration_queries == kQWindow); /* window queries given: calibrated */
  CHECK(a.n_thresholds == 5 && a.thresholds != NULL);
  if (a.n_thresholds == 5 && a.thresholds) {
    CHECK(a.thresholds[0].quantile == 0.5 && a.thresholds[4].quantile == 0.95);
  }
  /* Every page of every (layer, KV head), K and V planes, float32. */
  CHECK(a.kv_bytes ==
        (uint64_t)kLayers * kKvHeads * (a.clustered_pages + a.always_pages) * 2 * a.page_rows * kDim * sizeof(float));
  CHECK(a.index_bytes > 0 && a.id > 0 && a.format_version >= 2 && a.created_unix > 0);
  CHECK(a.damage && a.damage[0] == '\0'); /* healthy (tests/tools_recovery_test.cc: a damaged one) */

  CHECK_OK(sqz_db_describe_context(db, "ctx_f16", &b));
  CHECK(b.dtype == SQZ_DTYPE_F16 && strcmp(b.model, "synthetic f16") == 0);
  CHECK(b.calibration_queries == 0 && b.n_thresholds == 0 && b.thresholds == NULL); /* no window queries */
  CHECK(b.kv_bytes * 2 == a.kv_bytes);
  CHECK(b.id != a.id);

  /* A handle describes the version it reads. */
  sqz_context* ctx = NULL;
  CHECK_OK(sqz_context_open(db, "ctx_f32", NULL, &ctx));
  sqz_context_info c;
  CHECK_OK(sqz_context_describe(ctx, &c));
  CHECK(c.id == a.id && strcmp(c.name, "ctx_f32") == 0 && c.n_tokens == kTokens && c.n_thresholds == 5);
  sqz_context_info_free(&c);
  CHECK(c.name == NULL && c.model == NULL && c.thresholds == NULL && c.damage == NULL); /* freed and zeroed */
  int begin = -1, end = -1, nq = -1;
  CHECK_OK(sqz_context_heads(ctx, &begin, &end, &nq));
  CHECK(begin == 0 && end == kKvHeads && nq == kQHeads);
  CHECK_OK(sqz_context_heads(ctx, NULL, NULL, NULL));

  sqz_verify_report vr;
  CHECK_OK(sqz_db_verify_context(db, "ctx_f32", &vr));
  CHECK(vr.records_checked > 0 &&
        vr.kv_pages_checked == (int64_t)kLayers * kKvHeads * (a.clustered_pages + a.always_pages) &&
        vr.bytes_checked > 0);
  CHECK_OK(sqz_db_verify_context(db, "ctx_f16", NULL));

  /* Same name again: refused, then replaced (a new generation). */
  CHECK_ERR(sqz_build_context_from_tensors(db, "ctx_f32", &f32.tensors, &bo, NULL), SQZ_ALREADY_EXISTS, "ctx_f32");
  sqz_build_options replace = bo;
  replace.replace = 1;
  CHECK_OK(sqz_build_context_from_tensors(db, "ctx_f32", &f32.tensors, &replace, NULL));
  sqz_context_info a2;
  CHECK_OK(sqz_db_describe_context(db, "ctx_f32", &a2));
  CHECK(a2.id != a.id && a2.id != b.id);
  sqz_context_info_free(&a2);
  /* The handle opened before the replace still reads its version. */
  CHECK(dense_error(ctx, &f32, 0, 0, kQHeads, 1, 0, 11) <= 1e-4);
  sqz_context_close(ctx);

  CHECK_OK(sqz_db_drop_context(db, "ctx_f16"));
  CHECK_OK(sqz_db_list_contexts(db, &names, &count));
  CHECK(count == 1 && strcmp(names[0], "ctx_f32") == 0);
  sqz_names_free(names);
  sqz_context_info_free(&b); /* describe overwrites *info: release what it held first */
  CHECK_ERR(sqz_db_describe_context(db, "ctx_f16", &b), SQZ_NOT_FOUND, "ctx_f16");
  CHECK(b.name == NULL && b.model == NULL && b.n_tokens == 0); /* zeroed on failure */
  CHECK_ERR(sqz_db_drop_context(db, "ctx_f16"), SQZ_NOT_FOUND, "ctx_f16");
  CHECK_ERR(sqz_context_open(db, "ctx_f16", NULL, &ctx), SQZ_NOT_FOUND, "ctx_f16");
  CHECK(ctx == NULL);
  CHECK_ERR(sqz_db_verify_context(db, "ctx_f16", NULL), SQZ_NOT_FOUND, "ctx_f16");

  sqz_context_info_free(&a);
  sqz_context_info_free(&b);
  sqz_context_info_free(NULL);
  kv_free(&f32);
  kv_free(&f16);
  sqz_db_close(db);
}

/* Dense mode equals dense attention (double reference), float32 and fp16,
 * decode and prefill, every layer, a custom scale, a KV-head range. */
static void case_dense(void) {
  sqz_db* db = open_db(tmp_path("dense.db"), 0);
  if (!db) return;
  kv_data f32, f16;
  kv_make(&f32, 3, SQZ_DTYPE_F32, 1);
  kv_make(&f16, 4, SQZ_DTYPE_F16, 0);
  if (!build(db, "f32", &f32) || !build(db, "f16", &f16)) return;
  const char* names[2] = {"f32", "f16"};
  const kv_data* data[2] = {&f32, &f16};
  for (int i = 0; i < 2; ++i) {
    sqz_context* ctx = NULL;
    REQUIRE_OK(sqz_context_open(db, names[i], NULL, &ctx));
    for (int layer = 0; layer < kLayers; ++layer) {
      const double e1 = dense_error(ctx, data[i], layer, 0, kQHeads, 1, 0, 100 + layer);
      const double e5 = dense_error(ctx, data[i], layer, 0, kQHeads, 5, 0, 200 + layer);
      const double es = dense_error(ctx, data[i], layer, 0, kQHeads, 2, 0.07f, 300 + layer);
      printf("dense %s layer %d: max relative error T=1 %.2e, T=5 %.2e, scale 0.07 %.2e\n", names[i], layer, e1, e5,
             es);
      CHECK(e1 <= 1e-4);
      CHECK(e5 <= 1e-4);
      CHECK(es <= 1e-4);
    }
    sqz_context_close(ctx);
  }
  /* A tensor-parallel rank serving KV head 1 only: q / o / lse are its
   * query heads (kGroup of them), in order. */
  sqz_open_options oo;
  CHECK_OK(sqz_open_options_init(&oo));
  CHECK(oo.device == SQZ_DEVICE_CPU && oo.kv_head_begin == 0 && oo.kv_head_end == -1 &&
        oo.residency == SQZ_RESIDENCY_STORAGE && oo.device_cache_bytes == 0);
  oo.kv_head_begin = 1;
  oo.kv_head_end = 2;
  sqz_context* rank = NULL;
  REQUIRE_OK(sqz_context_open(db, "f16", &oo, &rank));
  int begin = -1, end = -1, nq = -1;
  CHECK_OK(sqz_context_heads(rank, &begin, &end, &nq));
  CHECK(begin == 1 && end == 2 && nq == kGroup);
  const double er = dense_error(rank, &f16, 1, kGroup, kGroup, 3, 0, 400);
  printf("dense f16 KV head 1 only: max relative error %.2e\n", er);
  CHECK(er <= 1e-4);
  sqz_context_close(rank);
  kv_free(&f32);
  kv_free(&f16);
  sqz_db_close(db);
}

/* Budget, threshold and hierarchical modes: finite answers, the budget's
 * share of the keys read, fewer bytes than dense. */
static void case_sparse(void) {
  kv_data kv;
  sqz_db* db = db_with_context("sparse.db", "ctx", &kv, 5, SQZ_DTYPE_F32, 1);
  if (!db) return;
  sqz_context* ctx = NULL;
  REQUIRE_OK(sqz_context_open(db, "ctx", NULL, &ctx));
  const int T = 1;
  const size_t rows = (size_t)kQHeads * T;
  float* q = random_queries(9, rows * kDim);
  float* o = malloc(rows * kDim * sizeof(float));
  float* lse = malloc(rows * sizeof(float));
  const int64_t n_clustered = kTokens - kWindow - kSinks;

  sqz_query_options qo;
  CHECK_OK(sqz_query_options_init(&qo));
  CHECK(qo.mode == SQZ_MODE_BUDGET && qo.budget == 0.125 && qo.threshold_quantile < 0 && qo.gqa == SQZ_GQA_UNION &&
        qo.hierarchical == 0 && qo.per_query_selection == 0 && qo.softmax_scale == 0);
  sqz_attend_stats dense;
  qo.mode = SQZ_MODE_DENSE;
  CHECK_OK(sqz_context_attend(ctx, 0, q, T, &qo, o, lse, &dense));
  CHECK(dense.keys_selected == n_clustered * kKvHeads);
  CHECK(dense.keys_attended == (int64_t)kTokens * kQHeads * T);

  const double budgets[2] = {0.125, 0.25};
  for (int b = 0; b < 2; ++b) {
    for (int hier = 0; hier < 2; ++hier) {
      sqz_query_options_init(&qo);
      qo.budget = budgets[b];
      qo.hierarchical = hier;
      sqz_attend_stats st;
      memset(&st, 0xff, sizeof st);
      CHECK_OK(sqz_context_attend(ctx, 1, q, T, &qo, o, lse, &st));
      int finite = 1;
      for (size_t i = 0; i < rows * kDim; ++i) finite &= isfinite(o[i]) != 0;
      for (size_t i = 0; i < rows; ++i) finite &= isfinite(lse[i]) != 0;
      CHECK(finite);
      /* Per KV head the selection stops at the first cluster that reaches
       * budget * n_clustered keys: at least that many, over by less than a
       * cluster (about 20 keys here; bounded loosely). */
      const double target = budgets[b] * (double)n_clustered * kKvHeads;
      printf("budget %.3f%s: keys selected %lld (target %.0f), bytes read %llu (dense %llu)\n", budgets[b],
             hier ? " hierarchical" : "", (long long)st.keys_selected, target, (unsigned long long)st.bytes_read,
             (unsigned long long)dense.bytes_read);
      CHECK(st.keys_selected >= (int64_t)ceil(target - 1e-9));
      CHECK(st.keys_selected <= (int64_t)(1.5 * target) + 1);
      CHECK(st.clusters_selected > 0 && st.pages_read > 0 && st.segments_read > 0);
      CHECK(st.bytes_read > 0 && st.bytes_read < dense.bytes_read);
      /* Union policy: each query head attends its group's selection plus
       * the always-attended window and sinks. */
      CHECK(st.keys_attended == (st.keys_selected + (int64_t)(kWindow + kSinks) * kKvHeads) * kGroup * T);
    }
  }

  /* Threshold mode at a calibrated quantile; a quantile never calibrated is
   * an argument error naming it. */
  sqz_query_options_init(&qo);
  qo.mode = SQZ_MODE_THRESHOLD;
  qo.threshold_quantile = 0.9;
  sqz_attend_stats st;
  CHECK_OK(sqz_context_attend(ctx, 0, q, T, &qo, o, lse, &st));
  CHECK(st.keys_selected > 0 && st.keys_selected < n_clustered * kKvHeads);
  CHECK(isfinite(o[0]) && isfinite(lse[0]));
  qo.threshold_quantile = 0.33;
  CHECK_ERR(sqz_context_attend(ctx, 0, q, T, &qo, o, lse, NULL), SQZ_INVALID_ARGUMENT, "0.33");

  /* Prefill with per-head selections and the stats pointer omitted. */
  float* q4 = random_queries(10, (size_t)kQHeads * 4 * kDim);
  float* o4 = malloc((size_t)kQHeads * 4 * kDim * sizeof(float));
  float* lse4 = malloc((size_t)kQHeads * 4 * sizeof(float));
  sqz_query_options_init(&qo);
  qo.gqa = SQZ_GQA_PER_HEAD;
  qo.per_query_selection = 1;
  CHECK_OK(sqz_context_attend(ctx, 1, q4, 4, &qo, o4, lse4, NULL));
  CHECK(isfinite(o4[0]) && isfinite(lse4[kQHeads * 4 - 1]));
  /* options NULL: the defaults (budget 1/8). */
  CHECK_OK(sqz_context_attend(ctx, 1, q, T, NULL, o, lse, &st));
  CHECK(st.keys_selected >= (int64_t)ceil(0.125 * (double)n_clustered * kKvHeads - 1e-9));
  free(q4);
  free(o4);
  free(lse4);
  free(q);
  free(o);
  free(lse);
  sqz_context_close(ctx);
  kv_free(&kv);
  sqz_db_close(db);
}

/* Merging states: against a hand computation, empty states, arguments. */
static void case_merge(void) {
  /* Row 0: lse_a = log 1, lse_b = log 3 -> lse = log 4, o = (1 o_a + 3 o_b) / 4.
   * Row 1: b empty (lse -inf) -> a unchanged. Row 2: a empty -> b.
   * Row 3: both empty -> lse -inf, o = 0. */
  float o_a[4 * 2] = {1, 2, 5, 6, 9, 9, 7, 7};
  float lse_a[4] = {0.0f, 0.5f, -INFINITY, -INFINITY};
  const float o_b[4 * 2] = {3, -2, 8, 8, 4, -4, 1, 1};
  const float lse_b[4] = {(float)log(3.0), -INFINITY, 1.25f, -INFINITY};
  CHECK_OK(sqz_merge_attention_states(o_a, lse_a, o_b, lse_b, 4, 2));
  CHECK(fabs(lse_a[0] - log(4.0)) < 1e-6);
  CHECK(fabs(o_a[0] - (1 * 1 + 3 * 3) / 4.0) < 1e-6 && fabs(o_a[1] - (1 * 2 + 3 * -2) / 4.0) < 1e-6);
  CHECK(lse_a[1] == 0.5f && o_a[2] == 5 && o_a[3] == 6);
  CHECK(lse_a[2] == 1.25f && o_a[4] == 4 && o_a[5] == -4);
  CHECK(isinf(lse_a[3]) && lse_a[3] < 0 && o_a[6] == 0 && o_a[7] == 0);

  /* Merging is what splitting a softmax into two parts undoes: scores
   * {1, 2} and {0.5}, values 10, 20 and 30. */
  const double e1 = exp(1.0), e2 = exp(2.0), e3 = exp(0.5);
  float oa = (float)((10 * e1 + 20 * e2) / (e1 + e2)), la = (float)log(e1 + e2);
  const float ob = 30, lb = 0.5f;
  CHECK_OK(sqz_merge_attention_states(&oa, &la, &ob, &lb, 1, 1));
  CHECK(fabs(oa - (10 * e1 + 20 * e2 + 30 * e3) / (e1 + e2 + e3)) < 1e-4);
  CHECK(fabs(la - log(e1 + e2 + e3)) < 1e-5);

  CHECK_OK(sqz_merge_attention_states(NULL, NULL, NULL, NULL, 0, 8)); /* nothing to merge */
  CHECK_ERR(sqz_merge_attention_states(NULL, lse_a, o_b, lse_b, 4, 2), SQZ_INVALID_ARGUMENT, "o_a is NULL");
  CHECK_ERR(sqz_merge_attention_states(o_a, lse_a, o_b, NULL, 4, 2), SQZ_INVALID_ARGUMENT, "lse_b is NULL");
  CHECK_ERR(sqz_merge_attention_states(o_a, lse_a, o_b, lse_b, -1, 2), SQZ_INVALID_ARGUMENT, "negative");
  CHECK_ERR(sqz_merge_attention_states(o_a, lse_a, o_b, lse_b, 4, 0), SQZ_INVALID_ARGUMENT, "head_dim");
}

/* Build from a safetensors file; a missing file. */
static void case_file(void) {
  sqz_db* db = open_db(tmp_path("file.db"), 0);
  if (!db) return;
  kv_data kv;
  kv_make(&kv, 6, SQZ_DTYPE_F32, 0);
  const char* path = tmp_path("doc.safetensors");
  CHECK(write_kv_file(path, &kv, "from a file"));
  const sqz_build_options bo = build_options();
  sqz_build_stats st;
  CHECK_OK(sqz_build_context_from_file(db, "doc", path, &bo, &st));
  CHECK(st.keys_clustered == (int64_t)kLayers * kKvHeads * (kTokens - kWindow - kSinks));
  sqz_context_info info;
  CHECK_OK(sqz_db_describe_context(db, "doc", &info));
  CHECK(strcmp(info.model, "from a file") == 0 && info.n_tokens == kTokens && info.dtype == SQZ_DTYPE_F32 &&
        info.n_q_heads == kQHeads);
  sqz_context_info_free(&info);
  sqz_context* ctx = NULL;
  REQUIRE_OK(sqz_context_open(db, "doc", NULL, &ctx));
  const double e = dense_error(ctx, &kv, 1, 0, kQHeads, 2, 0, 500);
  printf("dense, context built from a file: max relative error %.2e\n", e);
  CHECK(e <= 1e-4);
  sqz_context_close(ctx);

  const char* missing = tmp_path("no_such_file.safetensors");
  CHECK_ERR(sqz_build_context_from_file(db, "missing", missing, &bo, NULL), SQZ_IO_ERROR, "no_such_file.safetensors");
  CHECK_ERR(sqz_build_context_from_file(db, "dir", g_tmp, NULL, NULL), SQZ_INVALID_ARGUMENT, "not a regular file");
  CHECK_ERR(sqz_context_open(db, "missing", NULL, &ctx), SQZ_NOT_FOUND, "missing");
  kv_free(&kv);
  sqz_db_close(db);
}

static void* other_thread(void* arg) {
  int* ok = arg;
  /* A new thread has no error yet, whatever the main thread's last one. */
  *ok = strcmp(sqz_last_error(), "") == 0;
  *ok &= sqz_db_refresh(NULL) == SQZ_INVALID_ARGUMENT && strstr(sqz_last_error(), "sqz_db_refresh") != NULL;
  return NULL;
}

/* Every argument error: the right code and a message naming the problem,
 * never a crash. */
static void case_errors(void) {
  /* Codes, names, version. */
  CHECK(SQZ_OK == 0 && SQZ_NOT_FOUND == 1 && SQZ_ABORTED == 7);
  CHECK(strcmp(sqz_status_name(SQZ_OK), "OK") == 0 && strcmp(sqz_status_name(SQZ_NOT_FOUND), "NotFound") == 0 &&
        strcmp(sqz_status_name(SQZ_CORRUPTION), "Corruption") == 0 &&
        strcmp(sqz_status_name(SQZ_INVALID_ARGUMENT), "InvalidArgument") == 0 &&
        strcmp(sqz_status_name(SQZ_IO_ERROR), "IOError") == 0 &&
        strcmp(sqz_status_name(SQZ_ALREADY_EXISTS), "AlreadyExists") == 0 &&
        strcmp(sqz_status_name(SQZ_NOT_SUPPORTED), "NotSupported") == 0 &&
        strcmp(sqz_status_name(SQZ_ABORTED), "Aborted") == 0 &&
        strcmp(sqz_status_name(SQZ_OUT_OF_MEMORY), "OutOfMemory") == 0 &&
        strcmp(sqz_status_name(SQZ_INTERNAL), "Internal") == 0 && strcmp(sqz_status_name(42), "Unknown") == 0 &&
        strcmp(sqz_status_name(-1), "Unknown") == 0);
  int major = -1, minor = -1, patch = -1;
  CHECK(sscanf(sqz_version(), "%d.%d.%d", &major, &minor, &patch) == 3 && major >= 0 && minor >= 0 && patch >= 0);

  /* Init functions. */
  CHECK_ERR(sqz_db_options_init(NULL), SQZ_INVALID_ARGUMENT, "sqz_db_options_init: options is NULL");
  CHECK_ERR(sqz_build_options_init(NULL), SQZ_INVALID_ARGUMENT, "sqz_build_options_init: options is NULL");
  CHECK_ERR(sqz_open_options_init(NULL), SQZ_INVALID_ARGUMENT, "sqz_open_options_init: options is NULL");
  CHECK_ERR(sqz_query_options_init(NULL), SQZ_INVALID_ARGUMENT, "sqz_query_options_init: options is NULL");
  sqz_db_options dbo;
  CHECK_OK(sqz_db_options_init(&dbo));
  CHECK(dbo.create_if_missing == 1 && dbo.error_if_exists == 0 && dbo.read_only == 0 && dbo.block_cache_bytes > 0 &&
        dbo.max_background_jobs > 0);
  sqz_build_options bo;
  CHECK_OK(sqz_build_options_init(&bo));
  CHECK(bo.window == 100 && bo.n_sinks == 4 && bo.fine_ratio == 0.05 && bo.coarse_ratio == 0.01 && bo.page_rows == 16 &&
        bo.kmeans_iters == 10 && bo.seed == 1234 && bo.replace == 0 && bo.read_ahead == 1);

  /* Opening databases. */
  sqz_db* db = (sqz_db*)&dbo; /* garbage: must be reset to NULL on failure */
  CHECK_ERR(sqz_db_open(NULL, NULL, &db), SQZ_INVALID_ARGUMENT, "sqz_db_open: path is NULL");
  CHECK(db == NULL);
  CHECK_ERR(sqz_db_open(tmp_path("x.db"), NULL, NULL), SQZ_INVALID_ARGUMENT, "sqz_db_open: db is NULL");
  dbo.create_if_missing = 0;
  CHECK_ERR(sqz_db_open(tmp_path("absent.db"), &dbo, &db), SQZ_NOT_FOUND, "absent.db");
  CHECK(db == NULL);
  dbo.create_if_missing = 1;
  dbo.read_only = 1;
  CHECK_ERR(sqz_db_open(tmp_path("absent.db"), &dbo, &db), SQZ_NOT_FOUND, "absent.db");
  FILE* f = fopen(tmp_path("a_file"), "w");
  CHECK(f && fputs("not a database", f) >= 0 && fclose(f) == 0);
  CHECK_ERR(sqz_db_open(tmp_path("a_file"), NULL, &db), SQZ_INVALID_ARGUMENT, "a_file");
  sqz_db_close(NULL);
  sqz_context_close(NULL);
  sqz_names_free(NULL);

  db = open_db(tmp_path("errors.db"), 0);
  if (!db) return;
  dbo.read_only = 0;
  dbo.error_if_exists = 1;
  sqz_db* again = NULL;
  CHECK_ERR(sqz_db_open(tmp_path("errors.db"), &dbo, &again), SQZ_ALREADY_EXISTS, "errors.db");
  kv_data kv;
  kv_make(&kv, 8, SQZ_DTYPE_F32, 0);

  /* Database calls. */
  char** names = (char**)&dbo;
  CHECK_ERR(sqz_db_list_contexts(NULL, &names, NULL), SQZ_INVALID_ARGUMENT, "sqz_db_list_contexts: db is NULL");
  CHECK(names == NULL);
  CHECK_ERR(sqz_db_list_contexts(db, NULL, NULL), SQZ_INVALID_ARGUMENT, "names is NULL");
  CHECK_ERR(sqz_db_refresh(NULL), SQZ_INVALID_ARGUMENT, "sqz_db_refresh: db is NULL");
  CHECK_OK(sqz_db_refresh(db)); /* read-write: a no-op */
  sqz_context_info info;
  CHECK_ERR(sqz_db_describe_context(NULL, "x", &info), SQZ_INVALID_ARGUMENT, "db is NULL");
  CHECK_ERR(sqz_db_describe_context(db, NULL, &info), SQZ_INVALID_ARGUMENT, "name is NULL");
  CHECK_ERR(sqz_db_describe_context(db, "x", NULL), SQZ_INVALID_ARGUMENT, "info is NULL");
  CHECK_ERR(sqz_db_drop_context(NULL, "x"), SQZ_INVALID_ARGUMENT, "db is NULL");
  CHECK_ERR(sqz_db_drop_context(db, NULL), SQZ_INVALID_ARGUMENT, "name is NULL");
  CHECK_ERR(sqz_db_verify_context(NULL, "x", NULL), SQZ_INVALID_ARGUMENT, "db is NULL");
  CHECK_ERR(sqz_db_verify_context(db, NULL, NULL), SQZ_INVALID_ARGUMENT, "name is NULL");
  CHECK_ERR(sqz_db_backup(NULL, "x", NULL), SQZ_INVALID_ARGUMENT, "db is NULL");
  CHECK_ERR(sqz_db_backup(db, NULL, NULL), SQZ_INVALID_ARGUMENT, "backup_dir is NULL");
  CHECK_ERR(sqz_restore(NULL, 0, "x"), SQZ_INVALID_ARGUMENT, "backup_dir is NULL");
  CHECK_ERR(sqz_restore("x", 0, NULL), SQZ_INVALID_ARGUMENT, "db_path is NULL");

  /* Builds. */
  CHECK_ERR(sqz_build_context_from_tensors(NULL, "c", &kv.tensors, NULL, NULL), SQZ_INVALID_ARGUMENT, "db is NULL");
  CHECK_ERR(sqz_build_context_from_tensors(db, NULL, &kv.tensors, NULL, NULL), SQZ_INVALID_ARGUMENT, "name is NULL");
  CHECK_ERR(sqz_build_context_from_tensors(db, "c", NULL, NULL, NULL), SQZ_INVALID_ARGUMENT, "kv is NULL");
  CHECK_ERR(sqz_build_context_from_file(NULL, "c", "p", NULL, NULL), SQZ_INVALID_ARGUMENT, "db is NULL");
  CHECK_ERR(sqz_build_context_from_file(db, NULL, "p", NULL, NULL), SQZ_INVALID_ARGUMENT, "name is NULL");
  CHECK_ERR(sqz_build_context_from_file(db, "c", NULL, NULL, NULL), SQZ_INVALID_ARGUMENT, "kv_path is NULL");
  sqz_kv_tensors bad = kv.tensors;
  bad.layers = NULL;
  CHECK_ERR(sqz_build_context_from_tensors(db, "c", &bad, NULL, NULL), SQZ_INVALID_ARGUMENT, "kv->layers is NULL");
  bad = kv.tensors;
  bad.n_layers = 0;
  CHECK_ERR(sqz_build_context_from_tensors(db, "c", &bad, NULL, NULL), SQZ_INVALID_ARGUMENT, "n_layers");
  bad = kv.tensors;
  bad.dtype = 3;
  CHECK_ERR(sqz_build_context_from_tensors(db, "c", &bad, NULL, NULL), SQZ_INVALID_ARGUMENT, "kv->dtype = 3");
  bad = kv.tensors;
  bad.n_q_heads = 3; /* not a multiple of n_kv_heads */
  CHECK_ERR(sqz_build_context_from_tensors(db, "c", &bad, NULL, NULL), SQZ_INVALID_ARGUMENT, "n_q_heads");
  sqz_kv_layer layers[kLayers];
  memcpy(layers, kv.layers, sizeof layers);
  layers[1].v = NULL;
  bad = kv.tensors;
  bad.layers = layers;
  CHECK_ERR(sqz_build_context_from_tensors(db, "c", &bad, NULL, NULL), SQZ_INVALID_ARGUMENT, "layers.1.v");
  memcpy(layers, kv.layers, sizeof layers);
  layers[0].q_window = kv.k[0]; /* window queries in one layer only */
  bad.q_window_len = kQWindow;
  CHECK_ERR(sqz_build_context_from_tensors(db, "c", &bad, NULL, NULL), SQZ_INVALID_ARGUMENT, "q_window");
  kv.k[1][77] = NAN; /* bad input values are refused, naming the layer */
  CHECK_ERR(sqz_build_context_from_tensors(db, "c", &kv.tensors, NULL, NULL), SQZ_INVALID_ARGUMENT, "layer 1");
  kv.k[1][77] = 0.5f;
  sqz_build_options bad_opt = build_options();
  bad_opt.page_rows = 0;
  CHECK_ERR(sqz_build_context_from_tensors(db, "c", &kv.tensors, &bad_opt, NULL), SQZ_INVALID_ARGUMENT, "page_rows");
  char** list = NULL;
  size_t count = 99;
  CHECK_OK(sqz_db_list_contexts(db, &list, &count));
  CHECK(count == 0 && list && list[0] == NULL); /* every failed build left nothing */
  sqz_names_free(list);
  if (!build(db, "c", &kv)) return;

  /* Opening contexts. */
  sqz_context* ctx = (sqz_context*)&dbo;
  CHECK_ERR(sqz_context_open(NULL, "c", NULL, &ctx), SQZ_INVALID_ARGUMENT, "sqz_context_open: db is NULL");
  CHECK(ctx == NULL);
  CHECK_ERR(sqz_context_open(db, NULL, NULL, &ctx), SQZ_INVALID_ARGUMENT, "name is NULL");
  CHECK_ERR(sqz_context_open(db, "c", NULL, NULL), SQZ_INVALID_ARGUMENT, "ctx is NULL");
  CHECK_ERR(sqz_context_open(db, "nope", NULL, &ctx), SQZ_NOT_FOUND, "nope");
  sqz_open_options oo;
  sqz_open_options_init(&oo);
  oo.device = 256; /* would read as CPU if cast to the C++ uint8_t enum */
  CHECK_ERR(sqz_context_open(db, "c", &oo, &ctx), SQZ_INVALID_ARGUMENT, "options->device = 256");
  sqz_open_options_init(&oo);
  oo.residency = -1;
  CHECK_ERR(sqz_context_open(db, "c", &oo, &ctx), SQZ_INVALID_ARGUMENT, "options->residency = -1");
  oo.residency = SQZ_RESIDENCY_DEVICE; /* the CPU engine reads from storage */
  CHECK_ERR(sqz_context_open(db, "c", &oo, &ctx), SQZ_NOT_SUPPORTED, "Residency");
  sqz_open_options_init(&oo);
  oo.kv_head_begin = 1;
  oo.kv_head_end = 5;
  CHECK_ERR(sqz_context_open(db, "c", &oo, &ctx), SQZ_INVALID_ARGUMENT, "KV head range");
  sqz_open_options_init(&oo);
  oo.device = SQZ_DEVICE_CUDA;
  const int cuda = sqz_context_open(db, "c", &oo, &ctx);
  if (cuda == SQZ_OK) { /* a CUDA build on a GPU machine */
    sqz_context_close(ctx);
  } else {
    CHECK_ERR(cuda, SQZ_NOT_SUPPORTED, NULL);
  }
  REQUIRE_OK(sqz_context_open(db, "c", NULL, &ctx));

  /* Context calls. */
  const size_t rows = (size_t)kQHeads * 2;
  float* q = random_queries(12, rows * kDim);
  float o[(size_t)kQHeads * 2 * kDim], lse[(size_t)kQHeads * 2];
  CHECK_ERR(sqz_context_describe(NULL, &info), SQZ_INVALID_ARGUMENT, "ctx is NULL");
  CHECK_ERR(sqz_context_describe(ctx, NULL), SQZ_INVALID_ARGUMENT, "info is NULL");
  CHECK_ERR(sqz_context_heads(NULL, NULL, NULL, NULL), SQZ_INVALID_ARGUMENT, "ctx is NULL");
  CHECK_ERR(sqz_context_attend(NULL, 0, q, 2, NULL, o, lse, NULL), SQZ_INVALID_ARGUMENT,
            "sqz_context_attend: ctx is NULL");
  CHECK_ERR(sqz_context_attend(ctx, 0, NULL, 2, NULL, o, lse, NULL), SQZ_INVALID_ARGUMENT, "q is NULL");
  CHECK_ERR(sqz_context_attend(ctx, 0, q, 2, NULL, NULL, lse, NULL), SQZ_INVALID_ARGUMENT, "o is NULL");
  CHECK_ERR(sqz_context_attend(ctx, 0, q, 2, NULL, o, NULL, NULL), SQZ_INVALID_ARGUMENT, "lse is NULL");
  CHECK_ERR(sqz_context_attend(ctx, kLayers, q, 2, NULL, o, lse, NULL), SQZ_INVALID_ARGUMENT, "layer");
  CHECK_ERR(sqz_context_attend(ctx, -1, q, 2, NULL, o, lse, NULL), SQZ_INVALID_ARGUMENT, "layer");
  CHECK_ERR(sqz_context_attend(ctx, 0, q, 0, NULL, o, lse, NULL), SQZ_INVALID_ARGUMENT, "T");
  sqz_query_options qo;
  sqz_query_options_init(&qo);
  qo.mode = 3;
  CHECK_ERR(sqz_context_attend(ctx, 0, q, 2, &qo, o, lse, NULL), SQZ_INVALID_ARGUMENT, "options->mode = 3");
  sqz_query_options_init(&qo);
  qo.gqa = 2;
  CHECK_ERR(sqz_context_attend(ctx, 0, q, 2, &qo, o, lse, NULL), SQZ_INVALID_ARGUMENT, "options->gqa = 2");
  sqz_query_options_init(&qo);
  qo.budget = NAN;
  CHECK_ERR(sqz_context_attend(ctx, 0, q, 2, &qo, o, lse, NULL), SQZ_INVALID_ARGUMENT, "budget");
  sqz_query_options_init(&qo);
  qo.mode = SQZ_MODE_THRESHOLD;
  qo.threshold_quantile = 0.9; /* built without window queries: not calibrated */
  CHECK_ERR(sqz_context_attend(ctx, 0, q, 2, &qo, o, lse, NULL), SQZ_INVALID_ARGUMENT, "calibrat");
  q[kDim + 3] = NAN;
  CHECK_ERR(sqz_context_attend(ctx, 0, q, 2, NULL, o, lse, NULL), SQZ_INVALID_ARGUMENT, "head 0 token 1 has a NaN");
  q[kDim + 3] = INFINITY;
  CHECK_ERR(sqz_context_attend(ctx, 0, q, 2, NULL, o, lse, NULL), SQZ_INVALID_ARGUMENT, "head 0 token 1 has a NaN");
  q[kDim + 3] = 0.25f;
  CHECK_OK(sqz_context_attend(ctx, 0, q, 2, NULL, o, lse, NULL)); /* the handle is still usable */

  /* The last error is per thread. */
  CHECK_ERR(sqz_context_attend(ctx, 0, q, 0, NULL, o, lse, NULL), SQZ_INVALID_ARGUMENT, "T");
  char before[256];
  snprintf(before, sizeof before, "%s", sqz_last_error());
  int thread_ok = 0;
  pthread_t th;
  CHECK(pthread_create(&th, NULL, other_thread, &thread_ok) == 0 && pthread_join(th, NULL) == 0);
  CHECK(thread_ok);
  CHECK(strcmp(before, sqz_last_error()) == 0);
  /* A successful call leaves it as it was. */
  CHECK_OK(sqz_context_heads(ctx, NULL, NULL, NULL));
  CHECK(strcmp(before, sqz_last_error()) == 0);

  free(q);
  sqz_context_close(ctx);
  kv_free(&kv);
  sqz_db_close(db);
}

/* A read-only database beside the writer: it sees the writer's commits
 * after a refresh and refuses writes; a context outlives its database
 * handle. */
static void case_readonly(void) {
  kv_data kv;
  sqz_db* w = db_with_context("shared.db", "first", &kv, 13, SQZ_DTYPE_F16, 0);
  if (!w) return;
  const char* path = tmp_path("shared.db");
  sqz_db* r = open_db(path, 1);
  if (!r) return;
  size_t count = 0;
  char** names = NULL;
  CHECK_OK(sqz_db_list_contexts(r, &names, &count));
  CHECK(count == 1 && strcmp(names[0], "first") == 0);
  sqz_names_free(names);
  const sqz_build_options bo = build_options();
  CHECK_ERR(sqz_build_context_from_tensors(r, "nope", &kv.tensors, &bo, NULL), SQZ_NOT_SUPPORTED, NULL);
  CHECK_ERR(sqz_db_drop_context(r, "first"), SQZ_NOT_SUPPORTED, NULL);
  CHECK_ERR(sqz_db_backup(r, tmp_path("ro.backup"), NULL), SQZ_NOT_SUPPORTED, "read-only");

  if (!build(w, "second", &kv)) return;
  CHECK_OK(sqz_db_list_contexts(r, &names, &count));
  CHECK(count == 1); /* the reader's view is fixed until it refreshes */
  sqz_names_free(names);
  CHECK_OK(sqz_db_refresh(r));
  CHECK_OK(sqz_db_list_contexts(r, &names, &count));
  CHECK(count == 2 && strcmp(names[1], "second") == 0);
  sqz_names_free(names);

  /* Close the database handle first: the context keeps it open. */
  sqz_context* ctx = NULL;
  REQUIRE_OK(sqz_context_open(r, "second", NULL, &ctx));
  sqz_db_close(r);
  const double e = dense_error(ctx, &kv, 0, 0, kQHeads, 1, 0, 600);
  printf("dense through a read-only database, after its handle was closed: max relative error %.2e\n", e);
  CHECK(e <= 1e-4);
  sqz_context_close(ctx);
  kv_free(&kv);
  sqz_db_close(w);
}

/* Backup and restore into a new directory. */
static void case_backup(void) {
  kv_data kv;
  sqz_db* db = db_with_context("orig.db", "ctx", &kv, 14, SQZ_DTYPE_F32, 1);
  if (!db) return;
  uint32_t id = 0;
  CHECK_OK(sqz_db_backup(db, tmp_path("b"), &id));
  CHECK(id == 1);
  CHECK_OK(sqz_db_backup(db, tmp_path("b"), &id));
  CHECK(id == 2);
  sqz_db_close(db);

  CHECK_OK(sqz_restore(tmp_path("b"), 0, tmp_path("restored.db")));
  CHECK_ERR(sqz_restore(tmp_path("b"), 1, tmp_path("restored.db")), SQZ_INVALID_ARGUMENT, "restored.db");
  CHECK_ERR(sqz_restore(tmp_path("b"), 9, tmp_path("other.db")), SQZ_NOT_FOUND, "no backup 9");
  CHECK_ERR(sqz_restore(tmp_path("orig.db"), 0, tmp_path("other.db")), SQZ_NOT_FOUND, "not a backup directory");
  sqz_db* restored = open_db(tmp_path("restored.db"), 0);
  if (!restored) return;
  CHECK_OK(sqz_db_verify_context(restored, "ctx", NULL));
  sqz_context* ctx = NULL;
  REQUIRE_OK(sqz_context_open(restored, "ctx", NULL, &ctx));
  CHECK(dense_error(ctx, &kv, 1, 0, kQHeads, 1, 0, 700) <= 1e-4);
  sqz_context_close(ctx);
  sqz_db_close(restored);
  kv_free(&kv);
}

/* Run with the allocation-failure shim preloaded (tests/alloc_fail_shim.cc,
 * tests/CMakeLists.txt): a C++ allocation that fails inside a call is
 * SQZ_OUT_OF_MEMORY with a message, and the library stays usable. */
static void case_oom(void) {
  if (!getenv("SQZ_FAIL_NEW_AT_LEAST") || !getenv("LD_PRELOAD")) {
    fprintf(stderr, "the oom case needs LD_PRELOAD=<alloc_fail_shim> and SQZ_FAIL_NEW_AT_LEAST\n");
    ++g_failures;
    return;
  }
  sqz_db* db = open_db(tmp_path("oom.db"), 0);
  if (!db) return;
  kv_data kv;
  kv_make(&kv, 15, SQZ_DTYPE_F32, 0);
  /* A million layers (all the same tensors): the per-layer views alone are
   * over 64 MiB of C++ allocations, above the shim's limit. */
  const int n_layers = 1000000;
  sqz_kv_layer* many = malloc((size_t)n_layers * sizeof *many);
  for (int i = 0; i < n_layers; ++i) many[i] = kv.layers[0];
  sqz_kv_tensors big = kv.tensors;
  big.n_layers = n_layers;
  big.layers = many;
  CHECK_ERR(sqz_build_context_from_tensors(db, "big", &big, NULL, NULL), SQZ_OUT_OF_MEMORY,
            "sqz_build_context_from_tensors: an allocation failed");
  free(many);
  char** names = NULL;
  size_t count = 99;
  CHECK_OK(sqz_db_list_contexts(db, &names, &count));
  CHECK(count == 0);
  sqz_names_free(names);
  CHECK(build(db, "small", &kv));
  kv_free(&kv);
  sqz_db_close(db);
}

typedef struct {
  const char* name;
  void (*run)(void);
} test_case;

static const test_case kCases[] = {
    {"catalog", case_catalog},   {"dense", case_dense},   {"sparse", case_sparse},
    {"merge", case_merge},       {"file", case_file},     {"errors", case_errors},
    {"readonly", case_readonly}, {"backup", case_backup}, {"oom", case_oom},
};

int main(int argc, char** argv) {
  const size_t n_cases = sizeof kCases / sizeof kCases[0];
  if (argc != 2) {
    fprintf(stderr, "usage: %s CASE | all\ncases:", argv[0]);
    for (size_t i = 0; i < n_cases; ++i) fprintf(stderr, " %s", kCases[i].name);
    fprintf(stderr, "\n");
    return 2;
  }
  make_tmp();
  int ran = 0;
  for (size_t i = 0; i < n_cases; ++i) {
    const int all = strcmp(argv[1], "all") == 0 && strcmp(kCases[i].name, "oom") != 0;
    if (!all && strcmp(argv[1], kCases[i].name) != 0) continue;
    const int failures = g_failures;
    kCases[i].run();
    printf("[%s] %s\n", g_failures == failures ? "pass" : "FAIL", kCases[i].name);
    ++ran;
  }
  if (!ran) {
    fprintf(stderr, "unknown case '%s'\n", argv[1]);
    return 2;
  }
  printf("capi_test %s (sqz %s): %d checks, %d failed\n", argv[1], sqz_version(), g_checks, g_failures);
  return g_failures ? 1 : 0;
}
