// KvSource implementations: safetensors KV files and caller-owned tensors.
// Both validate through one function (ValidateLayers) so a file and an
// in-memory cache are held to exactly the same rules.

#include "sqz/kv_source.h"

#include <array>
#include <climits>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <utility>

#include "util/half.h"
#include "util/safetensors.h"

namespace sqz {

namespace {

// What the validator needs to know about one tensor.
struct TensorDesc {
  std::string name;
  std::string dtype_name;
  bool dtype_supported = false;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
};

struct LayerDescs {
  std::optional<TensorDesc> k, v, q;
};

std::string LayerName(int layer, const char* suffix) { return "layers." + std::to_string(layer) + "." + suffix; }

// Parses "layers.<i>.<suffix>" with suffix k, v or q_window. Indices are
// canonical decimal (no sign, no leading zeros) so one layer has one name.
// Returns kOther for names of other tensors (ignored), kBad for a KV tensor
// name whose index is not canonical or not below kMaxLayers ("layers.01.k"
// must not silently become a file without layer 1).
constexpr int kMaxLayers = 1 << 20;
enum class NameKind { kOk, kOther, kBad };
NameKind ParseLayerName(const std::string& name, int* layer, std::string* suffix) {
  static constexpr std::string_view kPrefix = "layers.";
  if (name.compare(0, kPrefix.size(), kPrefix) != 0) return NameKind::kOther;
  const size_t pos = kPrefix.size();
  const size_t dot = name.find('.', pos);
  if (dot == std::string::npos) return NameKind::kOther;
  std::string s = name.substr(dot + 1);
  if (s != "k" && s != "v" && s != "q_window") return NameKind::kOther;
  const std::string_view digits(name.data() + pos, dot - pos);
  if (digits.empty() || digits.size() > 7 || (digits[0] == '0' && digits.size() > 1)) return NameKind::kBad;
  int v = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return NameKind::kBad;
    v = v * 10 + (c - '0');
  }
  if (v >= kMaxLayers) return NameKind::kBad;
  *layer = v;
  *suffix = std::move(s);
  return NameKind::kOk;
}

// Validates the per-layer tensors and fills *shape (all but `model`).
// `what` names the source in messages (a path, or "in-memory KV").
Status ValidateLayers(const std::string& what, const std::vector<LayerDescs>& layers,
                      std::optional<std::string> n_q_heads_text, std::optional<int> n_q_heads_value, KvShape* shape) {
  auto bad = [&](const std::string& msg) { return Status::InvalidArgument(what + ": " + msg); };
  if (layers.empty()) return bad("no KV tensors (expected layers.0.k, layers.0.v, ...)");
  const int n_layers = static_cast<int>(layers.size());
  for (int i = 0; i < n_layers; ++i) {
    for (const char* suffix : {"k", "v"}) {
      const auto& t = suffix[0] == 'k' ? layers[i].k : layers[i].v;
      if (!t) {
        return bad("missing layer " + std::to_string(i) + ": no tensor " + LayerName(i, suffix) +
                   " (layers must be numbered contiguously from 0; the highest layer present is " +
                   std::to_string(n_layers - 1) + ")");
      }
    }
  }
  const TensorDesc& ref = *layers[0].k;
  for (int i = 0; i < n_layers; ++i) {
    for (const TensorDesc* t : {&*layers[i].k, &*layers[i].v}) {
      if (!t->dtype_supported) return bad(t->name + " has dtype " + t->dtype_name + "; expected F16, BF16 or F32");
      if (t->dtype != ref.dtype) {
        return bad(t->name + " has dtype " + t->dtype_name + " but " + ref.name + " has " + ref.dtype_name +
                   " (all keys and values must share one dtype)");
      }
      if (t->shape.size() != 3) {
        return bad(t->name + " has shape " + ShapeToString(t->shape) + "; expected [n_kv_heads, n_tokens, head_dim]");
      }
      if (t->shape != ref.shape) {
        return bad(t->name + " has shape " + ShapeToString(t->shape) + " but " + ref.name + " has shape " +
                   ShapeToString(ref.shape) + " (shapes must match across layers and between k and v)");
      }
    }
  }
  const int64_t n_kv_heads = ref.shape[0], n_tokens = ref.shape[1], head_dim = ref.shape[2];
  if (n_kv_heads == 0) return bad(ref.name + " has shape " + ShapeToString(ref.shape) + ": no KV heads");
  if (n_tokens == 0)
    return bad("empty context: " + ref.name + " has shape " + ShapeToString(ref.shape) + " (0 tokens)");
  if (head_dim == 0) return bad(ref.name + " has shape " + ShapeToString(ref.shape) + ": head_dim is 0");
  if (n_kv_heads > INT_MAX || head_dim > INT_MAX)
    return bad(ref.name + " has shape " + ShapeToString(ref.shape) + ": too large");

  int n_q_heads = 0;
  if (n_q_heads_value) {
    n_q_heads = *n_q_heads_value;
    if (n_q_heads <= 0) return bad("n_q_heads must be a positive integer, got " + std::to_string(n_q_heads));
  } else {
    if (!n_q_heads_text) return bad("__metadata__ lacks n_q_heads (the number of query heads, required)");
    const std::string& s = *n_q_heads_text;
    bool ok = !s.empty() && s.size() <= 9 && s[0] != '0';
    for (char c : s) ok = ok && c >= '0' && c <= '9';
    if (!ok) return bad("__metadata__ n_q_heads '" + s + "' is not a positive integer");
    n_q_heads = std::stoi(s);
  }
  if (n_q_heads % n_kv_heads != 0) {
    return bad("n_q_heads " + std::to_string(n_q_heads) + " is not a multiple of n_kv_heads " +
               std::to_string(n_kv_heads) + " (from " + ref.name + " shape " + ShapeToString(ref.shape) + ")");
  }

  // Window queries: all layers or none, one shape.
  int q_window_len = 0;
  const TensorDesc* qref = nullptr;
  for (int i = 0; i < n_layers; ++i) {
    if (layers[i].q) {
      qref = &*layers[i].q;
      break;
    }
  }
  if (qref) {
    for (int i = 0; i < n_layers; ++i) {
      if (!layers[i].q) {
        return bad("missing " + LayerName(i, "q_window") + " while " + qref->name +
                   " is present (window queries must be given for every layer or none)");
      }
      const TensorDesc& q = *layers[i].q;
      if (!q.dtype_supported) return bad(q.name + " has dtype " + q.dtype_name + "; expected F16, BF16 or F32");
      if (q.shape.size() != 3 || q.shape[0] != n_q_heads || q.shape[2] != head_dim) {
        return bad(q.name + " has shape " + ShapeToString(q.shape) + "; expected [n_q_heads=" +
                   std::to_string(n_q_heads) + ", W, head_dim=" + std::to_string(head_dim) + "]");
      }
      if (q.shape[1] != qref->shape[1]) {
        return bad(q.name + " has shape " + ShapeToString(q.shape) + " but " + qref->name + " has shape " +
                   ShapeToString(qref->shape) + " (same window length W in every layer)");
      }
    }
    if (qref->shape[1] > INT_MAX) return bad(qref->name + ": window too long");
    q_window_len = static_cast<int>(qref->shape[1]);
  }

  shape->n_layers = n_layers;
  shape->n_kv_heads = static_cast<int>(n_kv_heads);
  shape->n_q_heads = n_q_heads;
  shape->n_tokens = n_tokens;
  shape->head_dim = static_cast<int>(head_dim);
  shape->dtype = ref.dtype;
  shape->q_window_len = q_window_len;
  return Status::OK();
}

// ---------------------------------------------------------------------------

class SafetensorsKvSource final : public KvSource {
 public:
  SafetensorsKvSource(std::unique_ptr<SafetensorsFile> file, KvShape shape,
                      std::vector<std::array<const SafetensorsEntry*, 3>> entries)
      : file_(std::move(file)), shape_(std::move(shape)), entries_(std::move(entries)) {}

  const KvShape& shape() const override { return shape_; }

  Status ReadLayer(int layer, std::vector<uint8_t>* k, std::vector<uint8_t>* v) override {
    if (layer < 0 || layer >= shape_.n_layers) {
      return Status::InvalidArgument(Describe() + ": layer " + std::to_string(layer) + " out of range");
    }
    const SafetensorsEntry* ek = entries_[layer][0];
    const SafetensorsEntry* ev = entries_[layer][1];
    k->resize(ek->nbytes);
    v->resize(ev->nbytes);
    SQZ_RETURN_IF_ERROR(file_->ReadRaw(*ek, k->data()));
    return file_->ReadRaw(*ev, v->data());
  }

  Status ReadQWindow(int layer, std::vector<float>* q) override {
    if (layer < 0 || layer >= shape_.n_layers) {
      return Status::InvalidArgument(Describe() + ": layer " + std::to_string(layer) + " out of range");
    }
    const SafetensorsEntry* eq = entries_[layer][2];
    if (!eq || shape_.q_window_len == 0) return Status::NotFound(Describe() + ": no window queries");
    q->resize(eq->nbytes / DTypeSize(eq->dtype));
    return file_->ReadFloat(*eq, q->data());
  }

  std::string Describe() const override { return file_->path(); }

 private:
  std::unique_ptr<SafetensorsFile> file_;
  KvShape shape_;
  std::vector<std::array<const SafetensorsEntry*, 3>> entries_;  // k, v, q_window per layer
};

class InMemoryKvSource final : public KvSource {
 public:
  InMemoryKvSource(KvShape shape, std::vector<KvLayerView> layers)
      : shape_(std::move(shape)), layers_(std::move(layers)) {}

  const KvShape& shape() const override { return shape_; }

  Status ReadLayer(int layer, std::vector<uint8_t>* k, std::vector<uint8_t>* v) override {
    if (layer < 0 || layer >= shape_.n_layers) {
      return Status::InvalidArgument(Describe() + ": layer " + std::to_string(layer) + " out of range");
    }
    const KvLayerView& l = layers_[layer];
    k->resize(l.k.nbytes());
    v->resize(l.v.nbytes());
    std::memcpy(k->data(), l.k.data, k->size());
    std::memcpy(v->data(), l.v.data, v->size());
    return Status::OK();
  }

  Status ReadQWindow(int layer, std::vector<float>* q) override {
    if (layer < 0 || layer >= shape_.n_layers) {
      return Status::InvalidArgument(Describe() + ": layer " + std::to_string(layer) + " out of range");
    }
    const TensorView& t = layers_[layer].q_window;
    if (t.data == nullptr || shape_.q_window_len == 0) return Status::NotFound(Describe() + ": no window queries");
    q->resize(static_cast<size_t>(t.numel()));
    ConvertToFloat(t.data, t.dtype, q->size(), q->data());
    return Status::OK();
  }

  std::string Describe() const override {
    return shape_.model.empty() ? std::string("in-memory KV") : "in-memory KV (" + shape_.model + ")";
  }

 private:
  KvShape shape_;
  std::vector<KvLayerView> layers_;
};

}  // namespace

Status OpenSafetensorsKvSource(const std::string& path, std::unique_ptr<KvSource>* out) {
  std::unique_ptr<SafetensorsFile> file;
  SQZ_RETURN_IF_ERROR(SafetensorsFile::Open(path, &file));

  // Group the layer tensors by index; the map is ordered so a gap shows up
  // as the first missing index.
  std::map<int, std::array<const SafetensorsEntry*, 3>> by_layer;
  for (const SafetensorsEntry& e : file->entries()) {
    int layer;
    std::string suffix;
    const NameKind kind = ParseLayerName(e.name, &layer, &suffix);
    if (kind == NameKind::kOther) continue;
    if (kind == NameKind::kBad) {
      return Status::InvalidArgument(path + ": tensor '" + e.name +
                                     "' is not a valid layer tensor name (expected layers.<i>.k, layers.<i>.v or "
                                     "layers.<i>.q_window with i written in decimal without leading zeros, i < " +
                                     std::to_string(kMaxLayers) + ")");
    }
    auto& slot =
        by_layer.try_emplace(layer, std::array<const SafetensorsEntry*, 3>{nullptr, nullptr, nullptr}).first->second;
    slot[suffix == "k" ? 0 : suffix == "v" ? 1 : 2] = &e;
  }
  // A gap is reported from the names alone, before anything is sized by the
  // highest index (layers.9999999.k must not allocate ten million layers).
  int expect = 0;
  for (const auto& [layer, slot] : by_layer) {
    if (layer != expect) {
      return Status::InvalidArgument(path + ": missing layer " + std::to_string(expect) + ": no tensor " +
                                     LayerName(expect, "k") +
                                     " (layers must be numbered contiguously from 0; the highest layer present is " +
                                     std::to_string(by_layer.rbegin()->first) + ")");
    }
    ++expect;
  }
  const int n_layers = static_cast<int>(by_layer.size());
  std::vector<LayerDescs> descs(static_cast<size_t>(n_layers));
  std::vector<std::array<const SafetensorsEntry*, 3>> entries(static_cast<size_t>(n_layers),
                                                              {nullptr, nullptr, nullptr});
  for (const auto& [layer, slot] : by_layer) {
    entries[layer] = slot;
    std::optional<TensorDesc>* dst[3] = {&descs[layer].k, &descs[layer].v, &descs[layer].q};
    for (int i = 0; i < 3; ++i) {
      if (!slot[i]) continue;
      TensorDesc d;
      d.name = slot[i]->name;
      d.dtype_name = slot[i]->dtype_name;
      d.dtype_supported = slot[i]->dtype_supported;
      d.dtype = slot[i]->dtype;
      d.shape = slot[i]->shape;
      *dst[i] = std::move(d);
    }
  }
  std::optional<std::string> nq;
  auto it = file->metadata().find("n_q_heads");
  if (it != file->metadata().end()) nq = it->second;

  KvShape shape;
  SQZ_RETURN_IF_ERROR(ValidateLayers(path, descs, nq, std::nullopt, &shape));
  auto mit = file->metadata().find("model");
  if (mit != file->metadata().end()) shape.model = mit->second;
  *out = std::make_unique<SafetensorsKvSource>(std::move(file), std::move(shape), std::move(entries));
  return Status::OK();
}

Status MakeInMemoryKvSource(int n_q_heads, std::vector<KvLayerView> layers, std::string model,
                            std::unique_ptr<KvSource>* out) {
  const std::string what = "in-memory KV";
  std::vector<LayerDescs> descs(layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    const int li = static_cast<int>(i);
    const TensorView* views[3] = {&layers[i].k, &layers[i].v, &layers[i].q_window};
    std::optional<TensorDesc>* dst[3] = {&descs[i].k, &descs[i].v, &descs[i].q};
    const char* suffix[3] = {"k", "v", "q_window"};
    for (int j = 0; j < 3; ++j) {
      const TensorView& t = *views[j];
      if (t.data == nullptr) {
        // An absent k/v is reported as a missing layer by the validator.
        if (j < 2 && !t.shape.empty() && t.numel() > 0) {
          return Status::InvalidArgument(what + ": " + LayerName(li, suffix[j]) + " has no data");
        }
        if (j == 2 || t.shape.empty()) continue;
      }
      for (int64_t s : t.shape) {
        if (s < 0) return Status::InvalidArgument(what + ": " + LayerName(li, suffix[j]) + " has a negative dimension");
      }
      TensorDesc d;
      d.name = LayerName(li, suffix[j]);
      d.dtype_name = DTypeName(t.dtype);
      d.dtype_supported = true;
      d.dtype = t.dtype;
      d.shape = t.shape;
      *dst[j] = std::move(d);
    }
  }
  KvShape shape;
  SQZ_RETURN_IF_ERROR(ValidateLayers(what, descs, std::nullopt, n_q_heads, &shape));
  shape.model = std::move(model);
  *out = std::make_unique<InMemoryKvSource>(std::move(shape), std::move(layers));
  return Status::OK();
}

}  // namespace sqz
