// Running independent pieces of work concurrently on one GPU, in a way CUDA
// graph capture records as parallel branches: side streams forked from a
// caller's stream with an event and joined back into it with events. The
// streams and events are created once per device (at the first ResidentKv
// opened on it), never during a call, so a fork can be captured.
//
// Thread-safety: ForkJoin may be called from many threads; calls on one
// device are serialised while they enqueue (enqueueing takes microseconds).
#pragma once

#include <functional>

#include "sqz/status.h"

namespace sqz::gpu {

// Creates the side streams of `device` if they do not exist yet.
Status EnsureSideStreams(int device);

// Calls enqueue(i, side_stream) for i in [0, n), the pieces spread over the
// side streams of `device` (`stream`, a cudaStream_t of that device; null:
// its legacy default stream); everything enqueued runs after what was
// enqueued on `stream` before, and what is enqueued on `stream` afterwards
// runs after all of it. An error from enqueue stops the loop (the fork is
// still joined) and is returned.
Status ForkJoin(int device, void* stream, int n, const std::function<Status(int, void*)>& enqueue);

}  // namespace sqz::gpu
