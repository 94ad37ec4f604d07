// Reading and writing safetensors files
// (8-byte little-endian header length, a JSON header, then the raw tensor
// bytes; little-endian, row-major).
//
// The reader validates the header fully before any tensor is read: JSON
// syntax, dtype and shape fields, offsets inside the data section,
// size == numel * element size, and the tensors tiling the data section
// exactly (no overlap, no gap, no trailing bytes). Only regular files are
// opened (a FIFO is refused at once, not waited on). Tensors with dtypes other than F32/F16/BF16
// are listed (dtype_name) but cannot be read as float.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "sqz/status.h"
#include "sqz/types.h"

namespace sqz {

struct SafetensorsEntry {
  std::string name;
  std::string dtype_name;  // as written in the header, e.g. "F16", "I32"
  bool dtype_supported = false;
  DType dtype = DType::kF32;  // valid when dtype_supported
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // absolute byte offset in the file
  uint64_t nbytes = 0;
};

class SafetensorsFile {
 public:
  // Opens and validates `path`. Errors name the path and the problem:
  // IOError (cannot open/read), Corruption (truncated file, bad JSON,
  // offsets beyond the file, size mismatch).
  static Status Open(const std::string& path, std::unique_ptr<SafetensorsFile>* out);
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // nullptr if absent.
  const SafetensorsEntry* Find(const std::string& name) const;

  // Reads the raw bytes of `e` into dst (e.nbytes bytes).
  Status ReadRaw(const SafetensorsEntry& e, void* dst) const;
  // Reads `e` converted to float32 into dst (numel floats).
  Status ReadFloat(const SafetensorsEntry& e, float* dst) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  int fd_ = -1;
  uint64_t file_size_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Collects tensors and writes them in one go. The data is copied on Add.
class SafetensorsWriter {
 public:
  void SetMetadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  // Adds a tensor (nbytes must equal numel * DTypeSize(dtype)).
  void Add(const std::string& name, DType dtype, std::vector<int64_t> shape, const void* data);
  // Writes `path` atomically (a fresh temporary file beside it, fsync,
  // rename). InvalidArgument, changing nothing, when `path` exists and is
  // not a regular file (a symlink, a directory, a device).
  Status WriteFile(const std::string& path) const;

 private:
  struct Tensor {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> data;
  };
  std::vector<Tensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace sqz
