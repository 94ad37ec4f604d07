// MUST compile (the control case): query/ may include storage's interface.
#include "storage/store.h"
int main() { return 0; }
