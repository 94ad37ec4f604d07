// Must NOT compile: storage/ may not include a header of a layer above it.
#include "index/kmeans.h"
int main() { return 0; }
