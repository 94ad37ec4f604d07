// Must NOT compile: the FlatBuffers-generated header is private to storage/.
#include "format_generated.h"
int main() { return 0; }
