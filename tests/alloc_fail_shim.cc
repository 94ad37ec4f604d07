// Allocation failure injection for the CLI tests (LD_PRELOAD): every
// operator new of at least $SQZ_FAIL_NEW_AT_LEAST bytes throws
// std::bad_alloc, as on a machine without the memory an input asks for.
// Without the variable the shim changes nothing.
#include <cstddef>
#include <cstdlib>
#include <new>

namespace {
size_t Threshold() {
  static const size_t t = [] {
    const char* e = std::getenv("SQZ_FAIL_NEW_AT_LEAST");
    return e ? static_cast<size_t>(std::strtoull(e, nullptr, 10)) : static_cast<size_t>(-1);
  }();
  return t;
}
}  // namespace

void* operator new(size_t n) {
  if (n >= Threshold()) throw std::bad_alloc();
  void* p = std::malloc(n ? n : 1);
  if (!p) throw std::bad_alloc();
  return p;
}
void* operator new[](size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }
