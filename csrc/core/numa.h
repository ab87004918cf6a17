// Host memory placed on a NUMA node, without libnuma: the raw mbind/get_mempolicy system
// calls. A GPU's DMA engine reads and writes host memory through its own socket's link;
// pinned pages on the other socket cross the inter-socket link on every copy. The CUDA
// engine maps its staging blocks here, preferring the GPU's node, then page-locks them.
#pragma once

#include <cstddef>

namespace tb::numa {

/// The highest node number the calls accept, plus one (Linux's MAX_NUMNODES on x86-64).
constexpr int kMaxNodes = 1024;

/// Anonymous memory from map_preferring(): `size` is nbytes rounded up to whole pages.
struct Mapping {
  void* ptr = nullptr;
  size_t size = 0;
  int error = 0;  // 0, or the errno of the mbind the kernel refused (the pages then
                  // follow the default policy: the node of the thread that touched them)
};

/// Maps at least nbytes of anonymous memory whose pages the kernel takes from `node` while
/// it has free memory there (MPOL_PREFERRED), and touches every page so they are placed
/// now, before anyone pins them. Throws std::bad_alloc when mmap fails and
/// std::invalid_argument for a node outside [0, kMaxNodes).
Mapping map_preferring(size_t nbytes, int node);

/// Unmaps memory from map_preferring() (ptr and size as it returned them).
void unmap(void* ptr, size_t size) noexcept;

/// The node the memory policy at addr prefers: >= 0 for an MPOL_PREFERRED policy, -1 for
/// any other policy, -errno when the kernel refuses the query.
int preferred_node(const void* addr) noexcept;

/// The node holding the page at addr (touched already), or -errno.
int page_node(const void* addr) noexcept;

}  // namespace tb::numa
