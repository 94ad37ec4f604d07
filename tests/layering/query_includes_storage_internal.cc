// Must NOT compile: query/ may not include storage's private headers.
// (tests/CMakeLists.txt builds this against sqz_query's include path and
// expects the build to fail.)
#include "db_impl.h"
int main() { return 0; }
