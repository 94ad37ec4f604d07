// Does a byte shuffle of 16-bit KV data before zstd pay? (DESIGN.md section
// 3 asks.) Splits each layer's K and V into 32 KiB chunks (the kv column
// family's SST block size) and compresses each with zstd at RocksDB's default
// level (3): as stored; byte-shuffled (all low bytes, then all high bytes)
// in one frame; and shuffled with the two halves in separate frames. Reports
// the compressed size and the compress / decompress rates.
//
//   shuffle_bench --kv FILE [--layers N]
#include <zstd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "util/safetensors.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Result {
  size_t raw = 0, packed = 0;
  double compress_s = 0, decompress_s = 0;
};

// mode 0: as stored; 1: shuffled, one zstd frame per chunk; 2: shuffled, the
// low-byte and high-byte halves as two frames (separate entropy tables).
void Compress(const std::vector<uint8_t>& data, int mode, Result* r) {
  const bool shuffle = mode != 0;
  constexpr size_t kChunk = 32 << 10;
  std::vector<uint8_t> in(kChunk), out(ZSTD_compressBound(kChunk)), back(kChunk);
  for (size_t off = 0; off < data.size(); off += kChunk) {
    const size_t n = std::min(kChunk, data.size() - off);
    if (shuffle) {
      for (size_t i = 0; i < n / 2; ++i) {
        in[i] = data[off + 2 * i];
        in[n / 2 + i] = data[off + 2 * i + 1];
      }
    } else {
      std::memcpy(in.data(), data.data() + off, n);
    }
    const int parts = mode == 2 ? 2 : 1;
    for (int p = 0; p < parts; ++p) {
      const size_t begin = p * (n / parts), len = parts == 1 ? n : (p == 0 ? n / 2 : n - n / 2);
      auto t0 = Clock::now();
      size_t c = ZSTD_compress(out.data(), out.size(), in.data() + begin, len, 3);
      auto t1 = Clock::now();
      size_t d = ZSTD_decompress(back.data(), back.size(), out.data(), c);
      auto t2 = Clock::now();
      if (ZSTD_isError(c) || ZSTD_isError(d) || d != len) {
        std::fprintf(stderr, "shuffle_bench: zstd failed\n");
        std::exit(1);
      }
      r->packed += c;
      r->compress_s += std::chrono::duration<double>(t1 - t0).count();
      r->decompress_s += std::chrono::duration<double>(t2 - t1).count();
    }
    r->raw += n;
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string path;
  int layers = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--kv")) path = argv[i + 1];
    if (!std::strcmp(argv[i], "--layers")) layers = std::atoi(argv[i + 1]);
  }
  if (path.empty()) {
    std::fprintf(stderr, "usage: shuffle_bench --kv FILE [--layers N]\n");
    return 2;
  }
  std::unique_ptr<sqz::SafetensorsFile> f;
  sqz::Status s = sqz::SafetensorsFile::Open(path, &f);
  if (!s.ok()) {
    std::fprintf(stderr, "shuffle_bench: %s\n", s.ToString().c_str());
    return 1;
  }
  Result plain, shuffled, split;
  for (int l = 0; l < layers; ++l) {
    for (const char* t : {"k", "v"}) {
      const sqz::SafetensorsEntry* e = f->Find("layers." + std::to_string(l) + "." + t);
      if (!e || !e->dtype_supported || sqz::DTypeSize(e->dtype) != 2) {
        std::fprintf(stderr, "shuffle_bench: %s: layers.%d.%s missing or not 16-bit\n", path.c_str(), l, t);
        return 1;
      }
      std::vector<uint8_t> data(e->nbytes);
      if (!(s = f->ReadRaw(*e, data.data())).ok()) {
        std::fprintf(stderr, "shuffle_bench: %s\n", s.ToString().c_str());
        return 1;
      }
      Compress(data, 0, &plain);
      Compress(data, 1, &shuffled);
      Compress(data, 2, &split);
    }
  }
  auto row = [](const char* name, const Result& r) {
    std::printf("%-11s %8.1f MB -> %8.1f MB  (%.1f%% of raw)  compress %.0f MB/s  decompress %.0f MB/s\n", name,
                r.raw / 1e6, r.packed / 1e6, 100.0 * r.packed / r.raw, r.raw / r.compress_s / 1e6,
                r.raw / r.decompress_s / 1e6);
  };
  std::printf("zstd level 3 on 32 KiB chunks of %s (%d layer(s), K and V):\n", path.c_str(), layers);
  row("as stored", plain);
  row("shuffled", shuffled);
  row("split", split);
  return 0;
}
