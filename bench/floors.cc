// Measures the ceilings that the performance notes compare against on this
// machine: single-precision GEMM rate through the BLAS FAISS uses (k-means
// floor), memory read bandwidth (CPU attention floor), and sequential write
// bandwidth with fsync to a directory (build write floor).
//
//   floors [--dir DIR] [--threads N]
#include <cblas.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

double Now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// k-means assignment shape: n keys x K centroids x d.
double GemmGflops(int n, int k, int d) {
  std::vector<float> a(static_cast<size_t>(n) * d), b(static_cast<size_t>(k) * d), c(static_cast<size_t>(n) * k);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>((i * 2654435761u) % 1000) / 1000.0f;
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>((i * 40503u) % 1000) / 1000.0f;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, k, d, 1.0f, a.data(), d, b.data(), d, 0.0f, c.data(), k);
  double best = 1e30;
  for (int r = 0; r < 3; ++r) {
    double t0 = Now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, k, d, 1.0f, a.data(), d, b.data(), d, 0.0f, c.data(), k);
    best = std::min(best, Now() - t0);
  }
  return 2.0 * n * k * d / best / 1e9;
}

double ReadGBps(size_t bytes) {
  std::vector<uint64_t> buf(bytes / 8);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = i;
  double best = 1e30;
  volatile uint64_t sink = 0;
  for (int r = 0; r < 5; ++r) {
    double t0 = Now();
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i + 4 <= buf.size(); i += 4) {
      s0 += buf[i];
      s1 += buf[i + 1];
      s2 += buf[i + 2];
      s3 += buf[i + 3];
    }
    sink = sink + s0 + s1 + s2 + s3;
    best = std::min(best, Now() - t0);
  }
  return bytes / best / 1e9;
}

double WriteGBps(const std::string& dir, size_t bytes) {
  std::string path = dir + "/floors_write_test.bin";
  std::vector<char> chunk(size_t{8} << 20);
  for (size_t i = 0; i < chunk.size(); ++i) chunk[i] = static_cast<char>(i * 131);
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) {
    std::perror(path.c_str());
    return 0;
  }
  double t0 = Now();
  for (size_t done = 0; done < bytes; done += chunk.size()) {
    if (::write(fd, chunk.data(), chunk.size()) != static_cast<ssize_t>(chunk.size())) {
      std::perror("write");
      break;
    }
  }
  fsync(fd);
  double dt = Now() - t0;
  close(fd);
  unlink(path.c_str());
  return bytes / dt / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = ".";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--dir")) dir = argv[i + 1];
  }
  std::printf("floors on this machine (%ld cores):\n", sysconf(_SC_NPROCESSORS_ONLN));
  double g32 = GemmGflops(32768, 1638, 128);
  std::printf("  sgemm (k-means assign, 32768 x 1638 x 128):  %.1f GFLOP/s\n", g32);
  double g8 = GemmGflops(8192, 410, 128);
  std::printf("  sgemm (8192 x 410 x 128):                   %.1f GFLOP/s\n", g8);
  double rd = ReadGBps(size_t{1} << 30);
  std::printf("  memory read (1 GiB, 4 streams):              %.1f GB/s\n", rd);
  double wr = WriteGBps(dir, size_t{1} << 30);
  std::printf("  sequential write + fsync (1 GiB to %s):  %.2f GB/s\n", dir.c_str(), wr);
  std::printf(
      "JSON {\"sgemm_gflops\":%.2f,\"sgemm_small_gflops\":%.2f,\"mem_read_gbps\":%.2f,\"disk_write_gbps\":%.3f}\n", g32,
      g8, rd, wr);
  return 0;
}
