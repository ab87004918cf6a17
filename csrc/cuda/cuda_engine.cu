#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "core/host_ceiling.h"
#include "cuda/cuda_engine.h"
#include "cuda/error.h"
#include "cuda/runtime.h"

namespace tb::cuda {
namespace {

#ifdef TB_TESTING
// Test-only fault switch (testing builds only; release builds carry no check): the copy
// call after `g_fail_copy_after` more succeed throws a CudaError, so tests can check that
// errors surface and the pool keeps working. Set through tensorbridge._C_testing.
std::atomic<int64_t> g_fail_copy_after{-1};

void maybe_inject_fault() {
  int64_t n = g_fail_copy_after.load(std::memory_order_relaxed);
  while (n >= 0) {
    if (g_fail_copy_after.compare_exchange_weak(n, n - 1)) {
      if (n == 0)
        throw CudaError(cudaErrorLaunchFailure, "injected fault (test switch)", __FILE__, __LINE__);
      return;
    }
  }
}
#else
inline void maybe_inject_fault() {}
#endif

class CudaEngine final : public TransferEngine {
 public:
  CudaEngine(int device, int numa_node) : device_(device), numa_node_(numa_node) {}

  void* alloc_pinned(size_t nbytes) override {
    return host_alloc(nbytes, numa_node_.load(std::memory_order_relaxed));
  }
  void free_pinned(void* ptr) noexcept override { host_free(ptr); }
  void copy_to_host_async(void* host, const void* device, size_t n, StreamHandle s) override {
    maybe_inject_fault();
    TB_CUDA_CHECK(cudaMemcpyAsync(host, device, n, cudaMemcpyDeviceToHost, stream(s)));
  }
  void copy_to_device_async(void* device, const void* host, size_t n, StreamHandle s) override {
    maybe_inject_fault();
    TB_CUDA_CHECK(cudaMemcpyAsync(device, host, n, cudaMemcpyHostToDevice, stream(s)));
  }
  EventHandle create_event() override {
    // An event belongs to the device current at creation: callers hold a DeviceGuard.
    cudaEvent_t e;
    TB_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    return reinterpret_cast<EventHandle>(e);
  }
  void destroy_event(EventHandle e) noexcept override {
    if (cudaEventDestroy(event(e)) != cudaSuccess) (void)cudaGetLastError();
  }
  void record(EventHandle e, StreamHandle s) override {
    TB_CUDA_CHECK(cudaEventRecord(event(e), stream(s)));
  }
  bool query(EventHandle e) override {
    const cudaError_t err = cudaEventQuery(event(e));
    if (err == cudaErrorNotReady) return false;
    TB_CUDA_CHECK(err);
    return true;
  }
  void synchronize(EventHandle e) override { TB_CUDA_CHECK(cudaEventSynchronize(event(e))); }
  void synchronize_stream(StreamHandle s) override {
    TB_CUDA_CHECK(cudaStreamSynchronize(stream(s)));
  }
  void enter_thread() override {
    // (a pool thread serves transfers to any device: set it every time; cheap when equal)
    TB_CUDA_CHECK(cudaSetDevice(device_));
  }

  void set_numa_node(int node) { numa_node_.store(node, std::memory_order_relaxed); }

  static cudaStream_t stream(StreamHandle s) { return reinterpret_cast<cudaStream_t>(s); }
  static cudaEvent_t event(EventHandle e) { return reinterpret_cast<cudaEvent_t>(e); }

 private:
  int device_;
  std::atomic<int> numa_node_;  // where staging blocks are placed; -1: no preference
};

struct Device {
  Device(int d, int numa_node, size_t budget, size_t reserved)
      : engine(d, numa_node), pool(engine, budget, reserved) {}
  CudaEngine engine;
  PinnedPool pool;
};

std::mutex g_mutex;
// Leaked on purpose (see the header); indexed by device.
auto* g_devices = new std::map<int, Device*>();
// Unset until set_pinned_budget() (or a pool's creation) fixes it: 0 is a valid budget
// (no staging at all), so it cannot double as "not set".
bool g_budget_set = false;
size_t g_budget = 0;
size_t g_reserved = 0;  // budget taken by arrays registered in place (every pool reserves it)
std::vector<int> g_numa_nodes;  // per device: the node its blocks prefer, -1 for none

// Makes device d current for the guard's lifetime and restores the caller's device after:
// the current device is per thread and shared with torch through the driver, so leaving
// it changed would move the caller's later allocations to another GPU. (Restoring a
// device that has no context yet makes one: a thread that never used CUDA, such as a
// garbage collector's, gets a context on its current device, GPU 0 by default. torch
// avoids it by remembering the device in its own thread state; this guard cannot.)
class DeviceGuard {
 public:
  explicit DeviceGuard(int d) {
    TB_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != d)
      TB_CUDA_CHECK(cudaSetDevice(d));
    else
      previous_ = -1;
  }
  ~DeviceGuard() {
    if (previous_ >= 0 && cudaSetDevice(previous_) != cudaSuccess) (void)cudaGetLastError();
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

size_t budget_locked() {
  if (!g_budget_set) {
    g_budget = default_pinned_budget();
    g_budget_set = true;
  }
  return g_budget;
}

// The engine and pool of device d; the caller holds a DeviceGuard for d.
Device& device(int d) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_devices->find(d);
  if (it != g_devices->end()) return *it->second;
  const int node = d < static_cast<int>(g_numa_nodes.size()) ? g_numa_nodes[d] : -1;
  Device* dev = new Device(d, node, budget_locked(), g_reserved);
  g_devices->emplace(d, dev);
  return *dev;
}

// Ranges this module registered: (address, size) -> references and the device whose
// context registered them.
struct Registration {
  int refs;
  int device;
};
std::mutex g_register_mutex;
auto* g_registered = new std::map<std::pair<uintptr_t, size_t>, Registration>();

// The device for a driver call that names none (tb.pin, tb.is_pinned): the thread's
// current one when the engine already works on it, else the first the engine works on,
// so that such a call does not make a context (and hold its memory) on a GPU that a
// process using only cuda:1 never touched. With no engine yet: the current device.
int engine_device() {
  int current = 0;
  TB_CUDA_CHECK(cudaGetDevice(&current));
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_devices->empty() || g_devices->count(current)) return current;
  return g_devices->begin()->first;
}

}  // namespace

void set_pinned_budget(size_t bytes) {
  // One call at a time from start to end (the GIL is released): two calls interleaved
  // could leave the pools at one budget and g_budget, which new pools take, at the other.
  static auto* setting = new std::mutex();  // (leaked, like the engine's other state)
  std::lock_guard<std::mutex> one_at_a_time(*setting);
  std::vector<Device*> devs;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_budget = bytes;
    g_budget_set = true;
    for (auto& [d, dev] : *g_devices) devs.push_back(dev);
  }
  for (Device* dev : devs) dev->pool.set_budget(bytes);
}

void set_numa_nodes(const std::vector<int>& nodes) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_numa_nodes = nodes;
  for (auto& [d, dev] : *g_devices)
    dev->engine.set_numa_node(d < static_cast<int>(nodes.size()) ? nodes[d] : -1);
}

PoolStats pinned_stats() {
  std::vector<Device*> devs;
  PoolStats total;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (auto& [d, dev] : *g_devices) devs.push_back(dev);
    total.budget = budget_locked();
  }
  for (Device* dev : devs) {
    const PoolStats s = dev->pool.stats();
    total.bytes_held += s.bytes_held;
    total.bytes_in_use += s.bytes_in_use;
    total.hits += s.hits;
    total.misses += s.misses;
    total.waits += s.waits;
    total.fallbacks += s.fallbacks;
    total.pin_failures += s.pin_failures;
    total.frees += s.frees;
  }
  return total;
}

bool reserve_pinned(size_t bytes) {
  // Under g_mutex throughout, so a pool created meanwhile starts with the reservation
  // (no path takes g_mutex while holding a pool's lock).
  std::lock_guard<std::mutex> lock(g_mutex);
  const size_t budget = budget_locked();
  if (bytes > budget || g_reserved > budget - bytes) return false;
  std::vector<Device*> done;
  done.reserve(g_devices->size());  // (push_back below cannot throw)
  for (auto& [d, dev] : *g_devices) {
    if (!dev->pool.reserve(bytes)) {
      for (Device* undo : done) undo->pool.unreserve(bytes);
      return false;
    }
    done.push_back(dev);
  }
  g_reserved += bytes;
  return true;
}

void unreserve_pinned(size_t bytes) noexcept {
  std::lock_guard<std::mutex> lock(g_mutex);
  bytes = std::min(bytes, g_reserved);
  g_reserved -= bytes;
  for (auto& [d, dev] : *g_devices) dev->pool.unreserve(bytes);
}

PipelineReport copy_to_host(int d, StreamHandle stream, const void* device_src, const HostView& dst,
                            const PipelineOptions& options) {
  DeviceGuard guard(d);
  Device& dev = device(d);
  return tb::copy_to_host(dev.engine, dev.pool, stream, device_src, dst, options);
}

PipelineReport copy_to_device(int d, StreamHandle stream, const HostView& src, void* device_dst,
                              const PipelineOptions& options) {
  DeviceGuard guard(d);
  Device& dev = device(d);
  return tb::copy_to_device(dev.engine, dev.pool, stream, src, device_dst, options);
}

PipelineReport copy_many_to_device(int d, StreamHandle stream, const std::vector<HostView>& srcs,
                                   const std::vector<size_t>& offsets, void* device_base,
                                   const PipelineOptions& options) {
  DeviceGuard guard(d);
  Device& dev = device(d);
  return tb::copy_many_to_device(dev.engine, dev.pool, stream, srcs, offsets, device_base, options);
}

Event copy_async(int d, StreamHandle stream, void* dst, const void* src, size_t n, bool to_host) {
  DeviceGuard guard(d);
  Device& dev = device(d);
  Event done(dev.engine);
  if (to_host)
    dev.engine.copy_to_host_async(dst, src, n, stream);
  else
    dev.engine.copy_to_device_async(dst, src, n, stream);
  try {
    done.record(stream);
  } catch (...) {
    // The copy is queued but nothing could track it: let it finish before the caller
    // lets go of its memory.
    dev.engine.synchronize_stream(stream);
    throw;
  }
  return done;
}

namespace {

// Whether [ptr, ptr + n) overlaps a range registered here; the caller holds
// g_register_mutex. (Registered ranges never overlap one another: the driver refuses
// to page-lock memory twice.)
bool overlaps_registered_locked(const void* ptr, size_t n) {
  const auto begin = reinterpret_cast<uintptr_t>(ptr);
  auto it = g_registered->lower_bound(std::make_pair(begin, size_t{0}));
  if (it != g_registered->end() && it->first.first < begin + n) return true;
  if (it == g_registered->begin()) return false;
  --it;
  return it->first.first + it->first.second > begin;
}

}  // namespace

void copy_small(int d, StreamHandle stream, void* dst, const void* src, size_t n, bool to_host) {
  if (n == 0) return;
  DeviceGuard guard(d);
  Device& dev = device(d);
  if (to_host)
    dev.engine.copy_to_host_async(dst, src, n, stream);
  else
    dev.engine.copy_to_device_async(dst, src, n, stream);
  dev.engine.synchronize_stream(stream);
}

bool copy_pinned(int d, StreamHandle stream, void* dst, const void* src, size_t n, bool to_host) {
  if (n == 0) return false;
  const void* host = to_host ? dst : src;
  DeviceGuard guard(d);
  // Pageable memory (the common refusal) is told apart without the registration lock,
  // which host_register and host_unregister hold across slow driver calls.
  if (!is_host_range_pinned(host, n)) return false;
  {
    // Under the registration lock: a range seen here as page-locked and not registered
    // here is someone else's, which the registration cache never registers or drops.
    std::lock_guard<std::mutex> lock(g_register_mutex);
    if (overlaps_registered_locked(host, n) || !is_host_range_pinned(host, n)) return false;
  }
  copy_small(d, stream, dst, src, n, to_host);
  return true;
}

std::vector<double> host_copy_seconds(int d, size_t nbytes, bool to_pinned, int repeats) {
  DeviceGuard guard(d);
  return tb::host_copy_seconds(device(d).engine, nbytes, to_pinned, repeats);
}

#ifdef TB_TESTING
void inject_copy_fault(int64_t after) { g_fail_copy_after.store(after); }
#endif

bool host_register(void* ptr, size_t nbytes, int device) {
  std::lock_guard<std::mutex> lock(g_register_mutex);
  const auto key = std::make_pair(reinterpret_cast<uintptr_t>(ptr), nbytes);
  auto it = g_registered->find(key);
  if (it != g_registered->end()) {
    ++it->second.refs;
    return true;
  }
  const int d = device >= 0 ? device : engine_device();
  DeviceGuard guard(d);  // (else the call would make a context on the thread's device)
  const cudaError_t err = cudaHostRegister(ptr, nbytes, cudaHostRegisterPortable);
  if (err == cudaErrorHostMemoryAlreadyRegistered) {
    (void)cudaGetLastError();
    return false;  // already page-locked by someone else: nothing to do, nothing to undo
  }
  TB_CUDA_CHECK(err);
  g_registered->emplace(key, Registration{1, d});
  return true;
}

bool host_unregister(void* ptr, size_t nbytes) {
  std::lock_guard<std::mutex> lock(g_register_mutex);
  auto it = g_registered->find(std::make_pair(reinterpret_cast<uintptr_t>(ptr), nbytes));
  if (it == g_registered->end()) return false;
  if (it->second.refs > 1) {
    --it->second.refs;
    return true;
  }
  // The last reference. The entry goes only once the memory is really unregistered: if
  // a call below throws, the range stays tracked (and pinned), so a later unpin retries
  // instead of leaving memory pinned that nothing knows about.
  // A copy queued on any device may still be reading or writing this memory.
  std::vector<int> used;
  {
    std::lock_guard<std::mutex> devices_lock(g_mutex);
    for (auto& [d, dev] : *g_devices) used.push_back(d);
  }
  for (int d : used) {
    DeviceGuard guard(d);
    TB_CUDA_CHECK(cudaDeviceSynchronize());
  }
  // With the device that registered it current (this may run on any thread: a garbage
  // collector's callback).
  DeviceGuard guard(it->second.device);
  TB_CUDA_CHECK(cudaHostUnregister(ptr));
  g_registered->erase(it);
  return true;
}

bool is_host_pinned(const void* ptr, size_t nbytes, int device) noexcept {
  int d = device;
  if (d < 0) {
    try {
      d = engine_device();
    } catch (...) {
      return false;
    }
  }
  try {
    DeviceGuard guard(d);
    return is_host_range_pinned(ptr, nbytes);
  } catch (...) {
    (void)cudaGetLastError();
    return false;
  }
}

}  // namespace tb::cuda
