// No exception crosses the public API (include/sqz/status.h): every entry
// point runs its body through Guarded, which turns an exception escaping it
// (std::bad_alloc on a machine without the memory an input asks for, or an
// exception from a dependency) into Status::Aborted naming the call.
#pragma once

#include <exception>
#include <new>
#include <string>
#include <string_view>
#include <utility>

#include "sqz/status.h"

namespace sqz::util {

template <typename F>
Status Guarded(std::string_view what, F&& body) noexcept {
  try {
    return std::forward<F>(body)();
  } catch (const std::bad_alloc&) {
    try {
      return Status::Aborted(std::string(what) + ": out of memory");
    } catch (...) {
      return Status::Aborted("out of memory");
    }
  } catch (const std::exception& e) {
    try {
      return Status::Aborted(std::string(what) + ": " + e.what());
    } catch (...) {
      return Status::Aborted("out of memory");
    }
  } catch (...) {
    return Status::Aborted("unknown exception");
  }
}

}  // namespace sqz::util
