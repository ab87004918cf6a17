// The CUDA transfer engine: the pipeline of core/ running on cudaMemcpyAsync, events
// and page-locked staging blocks, one pool per device.
//
// Plain C++ interface (no CUDA headers) so the bindings compile with the host compiler.
// Everything is created on first use and deliberately leaked at exit: no CUDA call may
// run from a static destructor, when the driver may already be gone.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/event.h"
#include "core/pinned_pool.h"
#include "core/pipeline.h"

namespace tb::cuda {

using tb::default_pinned_budget;
/// The budget of every device's pool, now and later (default_pinned_budget() until set).
void set_pinned_budget(size_t bytes);
/// The NUMA node each device's staging blocks are placed on (nodes[d] for device d; -1
/// or absent: no preference), for blocks pinned from now on. The Python layer finds the
/// nodes (sysfs) and passes them only on machines with more than one node.
void set_numa_nodes(const std::vector<int>& nodes);
/// Summed over the devices used so far.
PoolStats pinned_stats();
/// Takes bytes of every device's budget for memory registered in place (pools created
/// later start with it): false, and nothing taken, when some pool cannot make room.
bool reserve_pinned(size_t bytes);
/// Gives bytes taken by reserve_pinned() back.
void unreserve_pinned(size_t bytes) noexcept;

/// Device (dense) -> host view through the device's pool; blocks until done.
PipelineReport copy_to_host(int device, StreamHandle stream, const void* device_src,
                            const HostView& dst, const PipelineOptions& options);
/// Host view -> device (dense); returns once the last chunk is queued on `stream`.
PipelineReport copy_to_device(int device, StreamHandle stream, const HostView& src,
                              void* device_dst, const PipelineOptions& options);

/// Many host arrays packed into staging blocks -> device_base + offsets[i] (few copies).
PipelineReport copy_many_to_device(int device, StreamHandle stream,
                                   const std::vector<HostView>& srcs,
                                   const std::vector<size_t>& offsets, void* device_base,
                                   const PipelineOptions& options);

/// One asynchronous copy between page-locked host memory and the device, and the event
/// recorded after it (owned by the caller; neither side may be touched until it is done).
Event copy_async(int device, StreamHandle stream, void* dst, const void* src, size_t n,
                 bool to_host);
/// A blocking copy between the device and page-locked host memory that this module did
/// not register (torch's pinned tensors, empty_pinned arrays): queued on `stream`, then
/// the stream is waited for, as torch's blocking copy does. Returns false, having queued
/// nothing, when the host side is not page-locked or overlaps a range registered here
/// (those go through the registration cache, which keeps their use order for eviction).
bool copy_pinned(int device, StreamHandle stream, void* dst, const void* src, size_t n,
                 bool to_host);
/// A blocking copy between the device and any host memory: one cudaMemcpyAsync on
/// `stream` (the driver stages pageable memory itself), then the stream is waited for,
/// as torch's blocking copy does, without its dispatch. For small copies.
void copy_small(int device, StreamHandle stream, void* dst, const void* src, size_t n,
                bool to_host);
/// Seconds per copy between pageable memory and the device's page-locked memory with
/// the thread pool (the host ceiling H; see core/host_ceiling.h).
std::vector<double> host_copy_seconds(int device, size_t nbytes, bool to_pinned, int repeats);

#ifdef TB_TESTING
/// Test-only (testing builds): the copy after `after` more succeed fails with a CUDA
/// error (-1: off).
void inject_copy_fault(int64_t after);
#endif

/// Page-locks existing memory (cudaHostRegister), reference counted by address range,
/// with `device` current (-1: a device the engine already works on, see is_host_pinned).
/// Returns false when the range already lies in page-locked memory it did not register.
bool host_register(void* ptr, size_t nbytes, int device);
/// Drops one reference; unregisters at zero, with the registering device current. False
/// when the range was not registered here.
bool host_unregister(void* ptr, size_t nbytes);
/// is_host_range_pinned asked with `device` current. -1: the thread's current device if
/// the engine works on it, else one it works on, else the current device; a driver call
/// makes a context on the current device, so naming the device keeps a process that uses
/// only cuda:1 from holding one on GPU 0.
bool is_host_pinned(const void* ptr, size_t nbytes, int device) noexcept;

}  // namespace tb::cuda
