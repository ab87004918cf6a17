// The host's own copy ceiling H: how fast the engine's threads copy between ordinary
// (pageable) memory and page-locked memory from an engine. A staged transfer cannot
// beat min(link, H), so benchmarks report against it, measured in the same run.
#pragma once

#include <cstddef>
#include <vector>

#include "core/transfer_engine.h"

namespace tb {

/// Seconds per copy of nbytes, `repeats` times (after one warm-up copy), with the thread
/// pool's threads. to_pinned: pageable -> page-locked (what host-to-device staging
/// does), else page-locked -> pageable (device-to-host). Both buffers are touched first.
std::vector<double> host_copy_seconds(TransferEngine& engine, size_t nbytes, bool to_pinned,
                                      int repeats);

}  // namespace tb
