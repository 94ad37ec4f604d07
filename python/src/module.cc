// squeeze._core: the Python binding of the C++ API (include/sqz/*.h).
//
// Thin by design: argument checks that need the Python objects (dtype,
// contiguity, device, shapes of arrays) happen here with messages that name
// the argument; everything else is the library's own validation, whose
// Status becomes a Python exception of the matching class (squeeze.Error and
// its subclasses, created here). Tensors cross without copies through
// nanobind's ndarray (DLPack and the buffer protocol): numpy arrays, torch
// tensors on the CPU, and CUDA tensors for the device call. The GIL is
// released around every call into the library.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <climits>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "sqz/build.h"
#include "sqz/db.h"
#include "sqz/kv_source.h"
#include "sqz/query.h"
#include "sqz/status.h"
#include "sqz/types.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// ---------------------------------------------------------------------------
// Errors: one Python class per Status code, all under squeeze.Error.
// ---------------------------------------------------------------------------
struct StatusError {
  sqz::Status status;
};

PyObject* g_error_base = nullptr;
PyObject* g_error_by_code[8] = {};

void Check(const sqz::Status& s) {
  if (!s.ok()) throw StatusError{s};
}

[[noreturn]] void Fail(sqz::Status s) { throw StatusError{std::move(s)}; }

PyObject* NewError(nb::module_& m, const char* name, PyObject* base, PyObject* extra_base, const char* doc) {
  PyObject* bases = extra_base ? PyTuple_Pack(2, base, extra_base) : PyTuple_Pack(1, base);
  std::string qualified = std::string("squeeze.") + name;
  PyObject* cls = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, bases, nullptr);
  Py_DECREF(bases);
  if (cls == nullptr) throw nb::python_error();
  m.attr(name) = nb::handle(cls);
  return cls;
}

void RegisterErrors(nb::module_& m) {
  using Code = sqz::Status::Code;
  g_error_base = NewError(m, "Error", PyExc_Exception, nullptr,
                          "Base class of squeeze's errors; `code` names the status (e.g. 'NotFound').");
  auto add = [&](Code code, const char* name, PyObject* extra, const char* doc) {
    g_error_by_code[static_cast<int>(code)] = NewError(m, name, g_error_base, extra, doc);
  };
  add(Code::kNotFound, "NotFoundError", PyExc_LookupError, "No such context or file.");
  add(Code::kCorruption, "CorruptionError", nullptr, "Stored data failed its checks.");
  add(Code::kInvalidArgument, "InvalidArgumentError", PyExc_ValueError, "A bad argument or input value.");
  add(Code::kIOError, "StorageIOError", PyExc_OSError, "The file system or the store failed.");
  add(Code::kAlreadyExists, "AlreadyExistsError", nullptr, "The name or directory is taken.");
  add(Code::kNotSupported, "NotSupportedError", PyExc_NotImplementedError,
      "Not supported by this build, device or database (e.g. a write on a read-only open).");
  add(Code::kAborted, "AbortedError", nullptr, "The call stopped (out of memory, interrupted build, ...).");
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const StatusError& e) {
      const int code = static_cast<int>(e.status.code());
      PyObject* cls = (code > 0 && code < 8) ? g_error_by_code[code] : g_error_base;
      nb::object exc = nb::steal(PyObject_CallFunction(cls, "s", e.status.message().c_str()));
      if (!exc.is_valid()) return;  // the constructor raised; that error stands
      nb::setattr(exc, "code", nb::str(sqz::StatusCodeName(e.status.code())));
      PyErr_SetObject(cls, exc.ptr());
    }
  });
}

// ---------------------------------------------------------------------------
// Arrays
// ---------------------------------------------------------------------------
using Array = nb::ndarray<nb::ro>;  // any dtype/device, read-only view
using OutArray = nb::ndarray<>;     // writable

constexpr int kDLCpu = 1;
constexpr int kDLCuda = 2;
constexpr int kDLCudaHost = 3;

std::string DTypeString(nb::dlpack::dtype t) {
  const char* kind = "?";
  switch (static_cast<nb::dlpack::dtype_code>(t.code)) {
    case nb::dlpack::dtype_code::Int:
      kind = "int";
      break;
    case nb::dlpack::dtype_code::UInt:
      kind = "uint";
      break;
    case nb::dlpack::dtype_code::Float:
      kind = "float";
      break;
    case nb::dlpack::dtype_code::Bfloat:
      kind = "bfloat";
      break;
    case nb::dlpack::dtype_code::Complex:
      kind = "complex";
      break;
    case nb::dlpack::dtype_code::Bool:
      kind = "bool";
      break;
    default:
      break;
  }
  return std::string(kind) + std::to_string(t.bits);
}

// The squeeze dtype of an array, or InvalidArgument naming `what`.
sqz::DType ToDType(nb::dlpack::dtype t, const char* what) {
  if (t.lanes == 1) {
    if (t.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && t.bits == 32) return sqz::DType::kF32;
    if (t.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && t.bits == 16) return sqz::DType::kF16;
    if (t.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && t.bits == 16) return sqz::DType::kBF16;
  }
  Fail(sqz::Status::InvalidArgument(std::string(what) + ": dtype " + DTypeString(t) +
                                    " is not supported (float32, float16 or bfloat16)"));
}

std::string ShapeOf(const nb::ndarray<nb::ro>& a) {
  std::vector<int64_t> s(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) s[i] = static_cast<int64_t>(a.shape(i));
  return sqz::ShapeToString(s);
}

// Row-major contiguous (size-1 dimensions may have any stride).
template <typename A>
bool IsContiguous(const A& a) {
  int64_t expect = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != expect) return false;
    expect *= static_cast<int64_t>(a.shape(i));
  }
  return true;
}

struct ArraySpec {
  const char* what;
  bool cuda;  // device memory (else host memory)
};

template <typename A>
void CheckArray(const A& a, const ArraySpec& spec, const std::vector<int64_t>& shape, std::optional<sqz::DType> dtype) {
  const int dev = a.device_type();
  if (spec.cuda ? dev != kDLCuda : (dev != kDLCpu && dev != kDLCudaHost)) {
    const std::string where = dev == kDLCuda                          ? "a CUDA device"
                              : (dev == kDLCpu || dev == kDLCudaHost) ? "the CPU"
                                                                      : "DLPack device type " + std::to_string(dev);
    Fail(sqz::Status::InvalidArgument(std::string(spec.what) + ": the tensor is on " + where + ", expected " +
                                      (spec.cuda ? "a CUDA tensor (the context is on the GPU)" : "host memory")));
  }
  if (dtype) {
    const sqz::DType got = ToDType(a.dtype(), spec.what);
    if (got != *dtype) {
      Fail(sqz::Status::InvalidArgument(std::string(spec.what) + ": dtype " + DTypeString(a.dtype()) + ", expected " +
                                        sqz::DTypeName(*dtype)));
    }
  }
  std::vector<int64_t> got(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) got[i] = static_cast<int64_t>(a.shape(i));
  if (got != shape) {
    Fail(sqz::Status::InvalidArgument(std::string(spec.what) + ": shape " + sqz::ShapeToString(got) + ", expected " +
                                      sqz::ShapeToString(shape)));
  }
  if (!IsContiguous(a)) {
    Fail(sqz::Status::InvalidArgument(std::string(spec.what) +
                                      ": the tensor is not contiguous (row-major); pass a contiguous copy"));
  }
}

sqz::TensorView ViewOf(const Array& a, const char* what) {
  if (a.device_type() != kDLCpu && a.device_type() != kDLCudaHost) {
    Fail(sqz::Status::InvalidArgument(std::string(what) + ": tensors to build from must be in host memory"));
  }
  if (!IsContiguous(a)) {
    Fail(sqz::Status::InvalidArgument(std::string(what) + ": the tensor is not contiguous (row-major)"));
  }
  sqz::TensorView v;
  v.data = a.data();
  v.dtype = ToDType(a.dtype(), what);
  v.shape.resize(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) v.shape[i] = static_cast<int64_t>(a.shape(i));
  return v;
}

// ---------------------------------------------------------------------------
// Plain structs to and from dicts
// ---------------------------------------------------------------------------
nb::dict InfoDict(const sqz::ContextInfo& i) {
  nb::dict d;
  d["name"] = i.name;
  d["id"] = i.id;
  d["format_version"] = i.format_version;
  d["model"] = i.model;
  d["n_layers"] = i.n_layers;
  d["n_kv_heads"] = i.n_kv_heads;
  d["n_q_heads"] = i.n_q_heads;
  d["head_dim"] = i.head_dim;
  d["n_tokens"] = i.n_tokens;
  d["dtype"] = std::string(sqz::DTypeName(i.dtype));
  d["window"] = i.window;
  d["n_sinks"] = i.n_sinks;
  d["n_clustered"] = i.n_clustered;
  d["fine_ratio"] = i.fine_ratio;
  d["coarse_ratio"] = i.coarse_ratio;
  d["kmeans_iters"] = i.kmeans_iters;
  d["seed"] = i.seed;
  d["fine_clusters"] = i.fine_clusters;
  d["coarse_clusters"] = i.coarse_clusters;
  d["calibration_queries"] = i.calibration_queries;
  nb::list th;
  for (const auto& t : i.thresholds) {
    nb::dict x;
    x["quantile"] = t.quantile;
    x["flat"] = t.flat;
    x["coarse"] = t.coarse;
    x["fine"] = t.fine;
    th.append(x);
  }
  d["thresholds"] = th;
  d["page_rows"] = i.page_rows;
  d["clustered_pages"] = i.clustered_pages;
  d["always_pages"] = i.always_pages;
  d["cluster_size_histogram"] = i.cluster_size_histogram;
  d["kv_bytes"] = i.kv_bytes;
  d["index_bytes"] = i.index_bytes;
  d["bytes_on_disk"] = i.bytes_on_disk;
  d["build_seconds"] = i.build_seconds;
  d["created_unix"] = i.created_unix;
  d["damage"] = i.damage;  // "" when healthy
  return d;
}

nb::dict StatsDict(const sqz::AttendStats& s) {
  nb::dict d;
  nb::list heads;
  for (const auto& h : s.heads) {
    nb::dict x;
    x["keys_selected"] = h.keys_selected;
    x["keys_attended"] = h.keys_attended;
    x["clusters_scored"] = h.clusters_scored;
    x["clusters_selected"] = h.clusters_selected;
    x["segments_read"] = h.segments_read;
    x["pages_read"] = h.pages_read;
    x["bytes_read"] = h.bytes_read;
    heads.append(x);
  }
  d["heads"] = heads;
  d["keys_selected"] = s.keys_selected();
  d["bytes_read"] = s.bytes_read();
  d["seconds_score"] = s.seconds_score;
  d["seconds_read"] = s.seconds_read;
  d["seconds_attend"] = s.seconds_attend;
  return d;
}

// ---------------------------------------------------------------------------
// DB and context handles
// ---------------------------------------------------------------------------
// A context handle borrows its DB; the Python objects share ownership of it
// so the DB closes only after its last context (whatever order Python
// collects them in).
struct DbBox {
  std::unique_ptr<sqz::DB> db;
};

class DbObj {
 public:
  static DbObj Open(const std::string& path, bool read_only, bool create_if_missing, bool error_if_exists,
                    size_t block_cache_bytes) {
    sqz::Options o;
    o.read_only = read_only;
    o.create_if_missing = create_if_missing;
    o.error_if_exists = error_if_exists;
    o.block_cache_bytes = block_cache_bytes;
    auto box = std::make_shared<DbBox>();
    {
      nb::gil_scoped_release nogil;
      Check(sqz::DB::Open(o, path, &box->db));
    }
    DbObj r;
    r.box_ = std::move(box);
    return r;
  }

  sqz::DB* db() const {
    if (!box_ || !box_->db) Fail(sqz::Status::InvalidArgument("the database is closed"));
    return box_->db.get();
  }
  const std::shared_ptr<DbBox>& box() const { return box_; }

  void Close() {
    if (!box_) return;
    if (box_.use_count() > 1) {
      Fail(sqz::Status::InvalidArgument("close every context opened on this database first (" +
                                        std::to_string(box_.use_count() - 1) + " still open)"));
    }
    nb::gil_scoped_release nogil;
    box_.reset();
  }

 private:
  std::shared_ptr<DbBox> box_;
};

class ContextObj {
 public:
  static ContextObj Open(const DbObj& db, const std::string& name, const std::string& device, int device_id,
                         int kv_head_begin, int kv_head_end, const std::string& residency, size_t device_cache_bytes) {
    sqz::OpenOptions o;
    if (device == "cpu") {
      o.device = sqz::Device::kCpu;
    } else if (device == "cuda") {
      o.device = sqz::Device::kCuda;
    } else {
      Fail(sqz::Status::InvalidArgument("device must be 'cpu' or 'cuda', got '" + device + "'"));
    }
    o.device_id = device_id;
    o.kv_head_begin = kv_head_begin;
    o.kv_head_end = kv_head_end;
    if (residency == "storage") {
      o.residency = sqz::Residency::kStorage;
    } else if (residency == "device") {
      o.residency = sqz::Residency::kDevice;
    } else {
      Fail(sqz::Status::InvalidArgument("residency must be 'storage' or 'device', got '" + residency + "'"));
    }
    o.device_cache_bytes = device_cache_bytes;
    ContextObj c;
    sqz::DB* raw = db.db();
    c.box_ = db.box();
    {
      nb::gil_scoped_release nogil;
      Check(sqz::ContextHandle::Open(raw, name, o, &c.handle_));
    }
    return c;
  }

  const sqz::ContextHandle& h() const {
    if (!handle_) Fail(sqz::Status::InvalidArgument("the context is closed"));
    return *handle_;
  }

  void Close() {
    nb::gil_scoped_release nogil;
    handle_.reset();
    box_.reset();
  }

  // Host Attend: q [served q heads, T, d] float32 in host memory; o, lse
  // outputs of the same kind, written.
  std::optional<nb::dict> Attend(int layer, const Array& q, const OutArray& o, const OutArray& lse,
                                 const sqz::QueryOptions& options, bool want_stats) const {
    const auto& hd = h();
    const int64_t H = hd.n_served_q_heads(), d = hd.info().head_dim;
    if (q.ndim() != 3) {
      Fail(sqz::Status::InvalidArgument("q: shape " + ShapeOf(q) + ", expected [" + std::to_string(H) + ", T, " +
                                        std::to_string(d) + "] (served query heads, queries, head_dim)"));
    }
    const int64_t T = static_cast<int64_t>(q.shape(1));
    if (T < 1 || T > INT32_MAX) {
      Fail(sqz::Status::InvalidArgument("q: T = " + std::to_string(T) + " queries; it must be in [1, 2^31)"));
    }
    CheckArray(q, {"q", false}, {H, T, d}, sqz::DType::kF32);
    CheckArray(o, {"out", false}, {H, T, d}, sqz::DType::kF32);
    CheckArray(lse, {"lse", false}, {H, T}, sqz::DType::kF32);
    sqz::AttendStats stats;
    {
      nb::gil_scoped_release nogil;
      Check(hd.Attend(layer, static_cast<const float*>(q.data()), static_cast<int>(T), options,
                      static_cast<float*>(o.data()), static_cast<float*>(lse.data()), want_stats ? &stats : nullptr));
    }
    if (!want_stats) return std::nullopt;
    return StatsDict(stats);
  }

  size_t WorkspaceBytes(int T, const sqz::QueryOptions& options) const {
    size_t bytes = 0;
    Check(h().DeviceWorkspaceBytes(T, options, &bytes));
    return bytes;
  }

  // Device call: q / o of `dtype` in GPU memory in `layout`; lse fp32.
  void AttendDevice(int layer, const Array& q, const OutArray& o, const OutArray& lse, const OutArray& workspace,
                    uintptr_t stream, const std::string& layout, bool lse_base2,
                    const sqz::QueryOptions& options) const {
    const auto& hd = h();
    const int64_t H = hd.n_served_q_heads(), d = hd.info().head_dim;
    sqz::DeviceAttendArgs a;
    if (layout == "token_major") {
      a.layout = sqz::TensorLayout::kTokenMajor;
    } else if (layout == "head_major") {
      a.layout = sqz::TensorLayout::kHeadMajor;
    } else {
      Fail(sqz::Status::InvalidArgument("layout must be 'token_major' or 'head_major', got '" + layout + "'"));
    }
    if (q.ndim() != 3) {
      Fail(sqz::Status::InvalidArgument("q: shape " + ShapeOf(q) + ", expected 3 dimensions ([T, heads, d] or " +
                                        "[heads, T, d])"));
    }
    const bool tm = a.layout == sqz::TensorLayout::kTokenMajor;
    const int64_t T = static_cast<int64_t>(q.shape(tm ? 0 : 1));
    const sqz::DType dt = ToDType(q.dtype(), "q");
    const std::vector<int64_t> qshape = tm ? std::vector<int64_t>{T, H, d} : std::vector<int64_t>{H, T, d};
    CheckArray(q, {"q", true}, qshape, dt);
    CheckArray(o, {"out", true}, qshape, dt);
    CheckArray(lse, {"lse", true}, tm ? std::vector<int64_t>{T, H} : std::vector<int64_t>{H, T}, sqz::DType::kF32);
    if (workspace.device_type() != kDLCuda) {
      Fail(sqz::Status::InvalidArgument("workspace: expected a CUDA tensor"));
    }
    for (const auto* arr : {&o, &lse, &workspace}) {
      if (arr->device_id() != q.device_id()) {
        Fail(sqz::Status::InvalidArgument("q, out, lse and workspace must be on one GPU"));
      }
    }
    if (q.device_id() != hd.device_id()) {
      Fail(sqz::Status::InvalidArgument("q is on cuda:" + std::to_string(q.device_id()) +
                                        ", the context on cuda:" + std::to_string(hd.device_id())));
    }
    a.layer = layer;
    a.T = static_cast<int>(T);
    a.q = q.data();
    a.o = o.data();
    a.lse = static_cast<float*>(lse.data());
    a.dtype = dt;
    a.lse_base2 = lse_base2;
    a.workspace = workspace.data();
    a.workspace_bytes = workspace.nbytes();
    a.stream = reinterpret_cast<void*>(stream);
    nb::gil_scoped_release nogil;
    Check(hd.AttendDevice(a, options));
  }

 private:
  std::shared_ptr<DbBox> box_;
  std::unique_ptr<sqz::ContextHandle> handle_;
};

// ---------------------------------------------------------------------------
// Building
// ---------------------------------------------------------------------------
// Runs BuildContext with the GIL released; `progress` (a Python callable or
// None) is called with a dict after each (layer, KV head). An exception it
// raises (KeyboardInterrupt included: signals are checked there) stops the
// build: nothing is committed and the exception is re-raised as is.
nb::dict RunBuild(const DbObj& db, const std::string& name, sqz::KvSource* source, sqz::BuildOptions options,
                  nb::object progress) {
  std::optional<nb::python_error> py_error;
  options.on_progress = [&](const sqz::BuildProgress& p) {
    nb::gil_scoped_acquire gil;
    if (py_error) throw std::runtime_error("stopped by the progress callback");
    try {
      if (PyErr_CheckSignals() != 0) throw nb::python_error();
      if (!progress.is_none()) {
        nb::dict d;
        d["layer"] = p.layer;
        d["head"] = p.head;
        d["n_layers"] = p.n_layers;
        d["n_kv_heads"] = p.n_kv_heads;
        d["heads_done"] = p.heads_done;
        d["heads_total"] = p.heads_total;
        d["keys_per_second"] = p.keys_per_second;
        d["eta_seconds"] = p.eta_seconds;
        progress(d);
      }
    } catch (nb::python_error& e) {
      py_error.emplace(std::move(e));
      throw std::runtime_error("stopped by the progress callback");
    }
  };
  sqz::BuildStats stats;
  sqz::Status s;
  sqz::DB* raw = db.db();
  {
    nb::gil_scoped_release nogil;
    s = sqz::BuildContext(raw, name, source, options, &stats);
  }
  if (py_error) {
    py_error->restore();
    throw nb::python_error();
  }
  Check(s);
  nb::dict d;
  d["seconds_total"] = stats.seconds_total;
  d["seconds_read"] = stats.seconds_read;
  d["seconds_kmeans"] = stats.seconds_kmeans;
  d["seconds_calibrate"] = stats.seconds_calibrate;
  d["seconds_write"] = stats.seconds_write;
  d["keys_clustered"] = stats.keys_clustered;
  d["kv_bytes"] = stats.kv_bytes;
  d["index_bytes"] = stats.index_bytes;
  d["peak_rss_bytes"] = stats.peak_rss_bytes;
  return d;
}

nb::dict BuildFromFile(const DbObj& db, const std::string& name, const std::string& path,
                       const sqz::BuildOptions& options, nb::object progress) {
  std::unique_ptr<sqz::KvSource> src;
  {
    nb::gil_scoped_release nogil;
    Check(sqz::OpenSafetensorsKvSource(path, &src));
  }
  return RunBuild(db, name, src.get(), options, std::move(progress));
}

// layers: a sequence of (k, v) or (k, v, q_window) with k, v [n_kv_heads,
// n_tokens, head_dim] and q_window [n_q_heads, W, head_dim] float32 (or None).
nb::dict BuildFromTensors(const DbObj& db, const std::string& name, int n_q_heads, nb::sequence layers,
                          const std::string& model, const sqz::BuildOptions& options, nb::object progress) {
  std::vector<Array> keep;  // holds the array views alive for the build
  std::vector<sqz::KvLayerView> views;
  size_t i = 0;
  for (nb::handle item : layers) {
    nb::sequence t = nb::borrow<nb::sequence>(item);
    const size_t n = nb::len(t);
    if (n != 2 && n != 3) {
      Fail(sqz::Status::InvalidArgument("layers[" + std::to_string(i) + "]: expected (k, v) or (k, v, q_window)"));
    }
    const std::string at = "layers[" + std::to_string(i) + "]";
    sqz::KvLayerView lv;
    auto take = [&](nb::handle h, const std::string& what) {
      Array a;
      if (!nb::try_cast<Array>(h, a)) {
        Fail(sqz::Status::InvalidArgument(what + ": expected an array in host memory (numpy, or a torch CPU " +
                                          "tensor), got " + nb::type_name(h.type()).c_str()));
      }
      keep.push_back(std::move(a));
      return ViewOf(keep.back(), what.c_str());
    };
    lv.k = take(t[0], at + ".k");
    lv.v = take(t[1], at + ".v");
    if (n == 3 && !t[2].is_none()) lv.q_window = take(t[2], at + ".q_window");
    views.push_back(std::move(lv));
    ++i;
  }
  std::unique_ptr<sqz::KvSource> src;
  Check(sqz::MakeInMemoryKvSource(n_q_heads, std::move(views), model, &src));
  return RunBuild(db, name, src.get(), options, std::move(progress));
}

// The states of a merge: o_* [n, head_dim] of one dtype, lse_* [n] float32,
// all in host memory or all on the GPU. Returns (n, head_dim, dtype).
std::tuple<int64_t, int64_t, sqz::DType> CheckMergeStates(const OutArray& o_a, const OutArray& lse_a, const Array& o_b,
                                                          const Array& lse_b, bool cuda) {
  if (o_a.ndim() != 2) {
    Fail(sqz::Status::InvalidArgument("o_a: expected [n, head_dim] (reshape to 2 dimensions)"));
  }
  const int64_t n = static_cast<int64_t>(o_a.shape(0)), d = static_cast<int64_t>(o_a.shape(1));
  const sqz::DType dt = cuda ? ToDType(o_a.dtype(), "o_a") : sqz::DType::kF32;
  CheckArray(o_a, {"o_a", cuda}, {n, d}, dt);
  CheckArray(lse_a, {"lse_a", cuda}, {n}, sqz::DType::kF32);
  CheckArray(o_b, {"o_b", cuda}, {n, d}, dt);
  CheckArray(lse_b, {"lse_b", cuda}, {n}, sqz::DType::kF32);
  return {n, d, dt};
}

void Merge(const OutArray& o_a, const OutArray& lse_a, const Array& o_b, const Array& lse_b) {
  const auto [n, d, dt] = CheckMergeStates(o_a, lse_a, o_b, lse_b, /*cuda=*/false);
  nb::gil_scoped_release nogil;
  sqz::MergeAttentionStates(static_cast<float*>(o_a.data()), static_cast<float*>(lse_a.data()),
                            static_cast<const float*>(o_b.data()), static_cast<const float*>(lse_b.data()), n,
                            static_cast<int>(d));
}

void MergeDevice(const OutArray& o_a, const OutArray& lse_a, const Array& o_b, const Array& lse_b, bool lse_base2,
                 uintptr_t stream) {
  const auto [n, d, dt] = CheckMergeStates(o_a, lse_a, o_b, lse_b, /*cuda=*/true);
  nb::gil_scoped_release nogil;
  Check(sqz::MergeAttentionStatesDevice(o_a.data(), static_cast<float*>(lse_a.data()), o_b.data(),
                                        static_cast<const float*>(lse_b.data()), n, static_cast<int>(d), dt, lse_base2,
                                        reinterpret_cast<void*>(stream)));
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "squeeze's C++ core (see the squeeze package for the documented API)";
  RegisterErrors(m);
#ifdef SQZ_PY_HAVE_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif

  nb::enum_<sqz::SelectionMode>(m, "SelectionMode")
      .value("dense", sqz::SelectionMode::kDense)
      .value("budget", sqz::SelectionMode::kBudget)
      .value("threshold", sqz::SelectionMode::kThreshold);
  nb::enum_<sqz::GqaPolicy>(m, "GqaPolicy")
      .value("union", sqz::GqaPolicy::kUnion)
      .value("per_head", sqz::GqaPolicy::kPerHead);

  nb::class_<sqz::QueryOptions>(m, "QueryOptions", "sqz::QueryOptions (include/sqz/query.h)")
      .def(nb::init<>())
      .def_rw("mode", &sqz::QueryOptions::mode)
      .def_rw("budget", &sqz::QueryOptions::budget)
      .def_rw("threshold_quantile", &sqz::QueryOptions::threshold_quantile)
      .def_rw("threshold", &sqz::QueryOptions::threshold)
      .def_rw("threshold_coarse", &sqz::QueryOptions::threshold_coarse)
      .def_rw("hierarchical", &sqz::QueryOptions::hierarchical)
      .def_rw("coarse_budget_factor", &sqz::QueryOptions::coarse_budget_factor)
      .def_rw("gqa", &sqz::QueryOptions::gqa)
      .def_rw("per_query_selection", &sqz::QueryOptions::per_query_selection)
      .def_rw("softmax_scale", &sqz::QueryOptions::softmax_scale);

  nb::class_<sqz::BuildOptions>(m, "BuildOptions", "sqz::BuildOptions (include/sqz/build.h)")
      .def(nb::init<>())
      .def_rw("window", &sqz::BuildOptions::window)
      .def_rw("n_sinks", &sqz::BuildOptions::n_sinks)
      .def_rw("fine_ratio", &sqz::BuildOptions::fine_ratio)
      .def_rw("coarse_ratio", &sqz::BuildOptions::coarse_ratio)
      .def_rw("page_rows", &sqz::BuildOptions::page_rows)
      .def_rw("kmeans_iters", &sqz::BuildOptions::kmeans_iters)
      .def_rw("seed", &sqz::BuildOptions::seed)
      .def_rw("read_ahead", &sqz::BuildOptions::read_ahead)
      .def_rw("quantiles", &sqz::BuildOptions::quantiles)
      .def_rw("coarse_share", &sqz::BuildOptions::coarse_share)
      .def_rw("replace", &sqz::BuildOptions::replace);

  nb::class_<DbObj>(m, "DB")
      .def_static("open", &DbObj::Open, "path"_a, "read_only"_a = false, "create_if_missing"_a = true,
                  "error_if_exists"_a = false, "block_cache_bytes"_a = size_t{512} << 20)
      .def_prop_ro("path", [](const DbObj& d) { return d.db()->path(); })
      .def_prop_ro("read_only", [](const DbObj& d) { return d.db()->read_only(); })
      .def_prop_ro("closed", [](const DbObj& d) { return !d.box() || !d.box()->db; })
      .def("refresh",
           [](const DbObj& d) {
             sqz::DB* db = d.db();
             nb::gil_scoped_release nogil;
             Check(db->Refresh());
           })
      .def("contexts",
           [](const DbObj& d) {
             std::vector<std::string> names;
             sqz::DB* db = d.db();
             {
               nb::gil_scoped_release nogil;
               Check(db->ListContexts(&names));
             }
             return names;
           })
      .def(
          "describe",
          [](const DbObj& d, const std::string& name) {
            sqz::ContextInfo info;
            sqz::DB* db = d.db();
            {
              nb::gil_scoped_release nogil;
              Check(db->DescribeContext(name, &info));
            }
            return InfoDict(info);
          },
          "name"_a)
      .def(
          "drop",
          [](const DbObj& d, const std::string& name) {
            sqz::DB* db = d.db();
            nb::gil_scoped_release nogil;
            Check(db->DropContext(name));
          },
          "name"_a)
      .def(
          "verify",
          [](const DbObj& d, const std::string& name) {
            sqz::VerifyReport r;
            sqz::DB* db = d.db();
            {
              nb::gil_scoped_release nogil;
              Check(db->VerifyContext(name, &r));
            }
            nb::dict out;
            out["records_checked"] = r.records_checked;
            out["kv_pages_checked"] = r.kv_pages_checked;
            out["bytes_checked"] = r.bytes_checked;
            return out;
          },
          "name"_a)
      .def("close", &DbObj::Close);

  nb::class_<ContextObj>(m, "Context")
      .def_static("open", &ContextObj::Open, "db"_a, "name"_a, "device"_a = "cpu", "device_id"_a = 0,
                  "kv_head_begin"_a = 0, "kv_head_end"_a = -1, "residency"_a = "storage", "device_cache_bytes"_a = 0)
      .def_prop_ro("info", [](const ContextObj& c) { return InfoDict(c.h().info()); })
      .def_prop_ro("device_id", [](const ContextObj& c) { return c.h().device_id(); })
      .def_prop_ro("kv_head_begin", [](const ContextObj& c) { return c.h().kv_head_begin(); })
      .def_prop_ro("kv_head_end", [](const ContextObj& c) { return c.h().kv_head_end(); })
      .def_prop_ro("n_served_q_heads", [](const ContextObj& c) { return c.h().n_served_q_heads(); })
      .def("attend", &ContextObj::Attend, "layer"_a, "q"_a, "out"_a, "lse"_a, "options"_a, "stats"_a = false)
      .def("workspace_bytes", &ContextObj::WorkspaceBytes, "T"_a, "options"_a)
      .def("attend_device", &ContextObj::AttendDevice, "layer"_a, "q"_a, "out"_a, "lse"_a, "workspace"_a, "stream"_a,
           "layout"_a, "lse_base2"_a, "options"_a)
      .def("close", &ContextObj::Close);

  m.def("build_from_file", &BuildFromFile, "db"_a, "name"_a, "path"_a, "options"_a, "progress"_a = nb::none());
  m.def("build_from_tensors", &BuildFromTensors, "db"_a, "name"_a, "n_q_heads"_a, "layers"_a, "model"_a, "options"_a,
        "progress"_a = nb::none());
  m.def("merge_states", &Merge, "o_a"_a, "lse_a"_a, "o_b"_a, "lse_b"_a);
  m.def("merge_states_device", &MergeDevice, "o_a"_a, "lse_a"_a, "o_b"_a, "lse_b"_a, "lse_base2"_a, "stream"_a);
}
