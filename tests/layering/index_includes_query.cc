// Must NOT compile: index/ may not include a header of a layer above it.
#include "query/eval.h"
int main() { return 0; }
