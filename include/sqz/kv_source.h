// KvSource: where a fixed context's KV cache comes from when it is indexed.
//
// A source is either a safetensors file in the squeeze KV format (see
// docs/FORMAT.md, "Input: the KV file") or tensors already in memory (a
// serving stack handing over its KV without writing a file). The builder pulls
// one layer at a time, so a source never needs to hold more than one layer.
//
// Thread-safety: a KvSource is used by one thread at a time.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "sqz/status.h"
#include "sqz/types.h"

namespace sqz {

struct KvShape {
  int n_layers = 0;
  int n_kv_heads = 0;
  int n_q_heads = 0;  // multiple of n_kv_heads
  int64_t n_tokens = 0;
  int head_dim = 0;
  DType dtype = DType::kF16;  // dtype of K and V (identical for all layers)
  int q_window_len = 0;       // W' of layers.{i}.q_window; 0 when absent
  std::string model;          // free text from __metadata__["model"], may be ""
};

class KvSource {
 public:
  virtual ~KvSource() = default;

  // Shapes, validated when the source was opened.
  virtual const KvShape& shape() const = 0;

  // Reads layer `layer`'s keys and values, each laid out as
  // [n_kv_heads, n_tokens, head_dim] in shape().dtype, into *k and *v
  // (resized to fit). Keys are post-RoPE.
  // On error: IOError / Corruption naming the source and tensor; *k, *v
  // contents are unspecified.
  virtual Status ReadLayer(int layer, std::vector<uint8_t>* k, std::vector<uint8_t>* v) = 0;

  // Reads layer `layer`'s window queries [n_q_heads, q_window_len, head_dim]
  // converted to float32. NotFound when the source has none.
  virtual Status ReadQWindow(int layer, std::vector<float>* q) = 0;

  // Human-readable origin for messages, e.g. the file path.
  virtual std::string Describe() const = 0;
};

// Opens a safetensors KV file and validates its header: every layer present,
// consistent shapes and dtype across layers, offsets inside the file,
// n_q_heads in __metadata__ and a multiple of n_kv_heads, n_tokens > 0.
// Tensor data is read lazily by ReadLayer (pread, no mmap).
// On error: InvalidArgument / Corruption / IOError naming `path` and the
// offending tensor or field.
Status OpenSafetensorsKvSource(const std::string& path, std::unique_ptr<KvSource>* out);

// One layer of an in-memory KV cache. k and v: [n_kv_heads, n_tokens,
// head_dim]; q_window (optional, data == nullptr when absent):
// [n_q_heads, W', head_dim]. The buffers are not copied: they must outlive the
// source.
struct KvLayerView {
  TensorView k;
  TensorView v;
  TensorView q_window;
};

// Wraps caller-owned tensors as a KvSource, validating shapes like
// OpenSafetensorsKvSource does.
Status MakeInMemoryKvSource(int n_q_heads, std::vector<KvLayerView> layers, std::string model,
                            std::unique_ptr<KvSource>* out);

}  // namespace sqz
