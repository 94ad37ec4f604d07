// A k-means backend for tests (sqz/kmeans.h): forwards to the FAISS CPU
// backend, records every Run call, and lets a test tamper with the results
// or fail a call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <vector>

#include "index/kmeans.h"
#include "sqz/kmeans.h"

namespace sqz::index_test {

class RecordingKMeansBackend : public KMeansBackend {
 public:
  // What Run saw of one problem (the pointers are only valid during Run).
  struct Problem {
    int64_t n, k;
    int d;
    bool weighted;
    uint64_t seed;
  };
  struct Call {
    std::vector<Problem> problems;
    KMeansParams params;
  };

  // Called after a successful inner Run with the call's index (0-based); may
  // modify the results or return an error.
  std::function<Status(size_t call, KMeansResult* results, size_t n)> after;
  // Throws std::runtime_error from Run instead of running.
  bool throw_on_run = false;

  std::vector<Call> calls;

  const char* name() const override { return "recording"; }

  Status Run(const KMeansProblem* problems, size_t n_problems, const KMeansParams& params,
             KMeansResult* results) override {
    Call c;
    c.params = params;
    for (size_t i = 0; i < n_problems; ++i) {
      const KMeansProblem& p = problems[i];
      c.problems.push_back({p.n, p.k, p.d, p.weights != nullptr, p.seed});
    }
    calls.push_back(c);
    if (throw_on_run) throw std::runtime_error("test backend throws");
    SQZ_RETURN_IF_ERROR(inner_->Run(problems, n_problems, params, results));
    return after ? after(calls.size() - 1, results, n_problems) : Status::OK();
  }

 private:
  std::unique_ptr<KMeansBackend> inner_ = index::MakeFaissKMeansBackend();
};

}  // namespace sqz::index_test
