// A small fixed-size thread pool for splitting large host copies.
//
// parallel_for() may be called from many threads at once (the bindings release
// the GIL). The calling thread always works on its own job too, so a job finishes
// even when every worker is busy with other callers' jobs, or after fork() when the
// child has no workers at all.
#pragma once

#include <cstdint>
#include <functional>

namespace tb {

/// Number of threads (workers + the caller) that parallel_for() uses.
int get_num_threads();

/// The most threads set_num_threads() accepts (the Python layer bounds it tighter).
constexpr int kMaxThreads = 4096;

/// Resize the pool; 1 <= n <= kMaxThreads, else std::invalid_argument. Jobs already
/// running finish on the old workers; the new pool starts on the next parallel_for().
void set_num_threads(int n);

/// Run fn(i) for i in [0, n) on up to get_num_threads() threads; returns when all are done.
/// fn must not throw. Throws std::runtime_error, before running anything, when the pool
/// has to be started and the OS refuses one of its threads.
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

}  // namespace tb
