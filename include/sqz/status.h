// Status: the result of every fallible call in the squeeze API.
//
// No exceptions cross the public API (every entry point runs under
// util::Guarded: an exception, std::bad_alloc included, becomes Aborted naming
// the call; tests/query_oom_test.cc). A call that can fail returns a Status;
// OK carries no allocation. Error statuses carry a code and a message that
// names the file, context or argument at fault and what is wrong with it.
//
// Thread-safety: a Status is a value; distinct objects may be used from
// different threads without synchronisation.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace sqz {

class [[nodiscard]] Status {
 public:
  enum class Code : uint8_t {
    kOk = 0,
    kNotFound = 1,
    kCorruption = 2,
    kInvalidArgument = 3,
    kIOError = 4,
    kAlreadyExists = 5,
    kNotSupported = 6,
    kAborted = 7,
  };

  Status() = default;  // OK
  Status(const Status& other);
  Status& operator=(const Status& other);
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;

  static Status OK() { return Status(); }
  static Status NotFound(std::string_view msg) { return Status(Code::kNotFound, msg); }
  static Status Corruption(std::string_view msg) { return Status(Code::kCorruption, msg); }
  static Status InvalidArgument(std::string_view msg) { return Status(Code::kInvalidArgument, msg); }
  static Status IOError(std::string_view msg) { return Status(Code::kIOError, msg); }
  static Status AlreadyExists(std::string_view msg) { return Status(Code::kAlreadyExists, msg); }
  static Status NotSupported(std::string_view msg) { return Status(Code::kNotSupported, msg); }
  static Status Aborted(std::string_view msg) { return Status(Code::kAborted, msg); }

  bool ok() const { return state_ == nullptr; }
  Code code() const { return state_ ? state_->code : Code::kOk; }
  bool IsNotFound() const { return code() == Code::kNotFound; }
  bool IsCorruption() const { return code() == Code::kCorruption; }
  bool IsInvalidArgument() const { return code() == Code::kInvalidArgument; }
  bool IsIOError() const { return code() == Code::kIOError; }
  bool IsAlreadyExists() const { return code() == Code::kAlreadyExists; }
  bool IsNotSupported() const { return code() == Code::kNotSupported; }
  bool IsAborted() const { return code() == Code::kAborted; }

  // The message alone ("" for OK).
  const std::string& message() const;
  // "<Code name>: <message>", or "OK".
  std::string ToString() const;

  // Returns a copy whose message is "<prefix>: <message>" (OK stays OK).
  Status WithPrefix(std::string_view prefix) const;

 private:
  struct State {
    Code code;
    std::string msg;
  };
  Status(Code code, std::string_view msg);
  std::unique_ptr<State> state_;
};

const char* StatusCodeName(Status::Code code);

}  // namespace sqz

// Internal helper used across the code base (not part of the stable API).
#define SQZ_RETURN_IF_ERROR(expr)    \
  do {                               \
    ::sqz::Status _sqz_s = (expr);   \
    if (!_sqz_s.ok()) return _sqz_s; \
  } while (0)
