#include "core/numa.h"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <new>
#include <stdexcept>
#include <string>

namespace tb::numa {
namespace {

// From <linux/mempolicy.h>, spelled out so that neither libnuma nor its headers are needed.
constexpr int kMpolPreferred = 1;
constexpr unsigned long kMpolFNode = 1UL << 0;
constexpr unsigned long kMpolFAddr = 1UL << 1;

constexpr int kMaskWords = kMaxNodes / (8 * sizeof(unsigned long));
// The kernel reads maxnode - 1 bits (an off-by-one it keeps for compatibility), so a mask
// of kMaxNodes bits is passed as kMaxNodes + 1.
constexpr unsigned long kMaxNode = kMaxNodes + 1;

size_t page_size() {
  const long page = sysconf(_SC_PAGE_SIZE);
  return page > 0 ? static_cast<size_t>(page) : 4096;
}

}  // namespace

Mapping map_preferring(size_t nbytes, int node) {
  if (node < 0 || node >= kMaxNodes)
    throw std::invalid_argument("map_preferring: node " + std::to_string(node) +
                                " is outside [0, " + std::to_string(kMaxNodes) + ")");
  const size_t page = page_size();
  Mapping m;
  m.size = (nbytes == 0 ? page : (nbytes + page - 1) / page * page);
  void* p = mmap(nullptr, m.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  m.ptr = p;
  unsigned long mask[kMaskWords] = {};
  mask[node / (8 * sizeof(unsigned long))] = 1UL << (node % (8 * sizeof(unsigned long)));
#ifdef SYS_mbind
  if (syscall(SYS_mbind, p, m.size, kMpolPreferred, mask, kMaxNode, 0) != 0) m.error = errno;
#else
  m.error = ENOSYS;  // (not Linux: no memory policies)
#endif
  // Placed when first touched: touch now, on this thread, so that pinning (which would
  // fault them in anyway) finds them where the policy put them.
  auto* bytes = static_cast<volatile char*>(p);
  for (size_t off = 0; off < m.size; off += page) bytes[off] = 0;
  return m;
}

void unmap(void* ptr, size_t size) noexcept {
  if (ptr != nullptr) (void)munmap(ptr, size);
}

#ifdef SYS_get_mempolicy
int preferred_node(const void* addr) noexcept {
  int mode = -1;
  unsigned long mask[kMaskWords] = {};
  if (syscall(SYS_get_mempolicy, &mode, mask, kMaxNode, addr, kMpolFAddr) != 0) return -errno;
  if (mode != kMpolPreferred) return -1;
  for (int w = 0; w < kMaskWords; ++w)
    if (mask[w] != 0)
      return w * 8 * static_cast<int>(sizeof(unsigned long)) + __builtin_ctzl(mask[w]);
  return -1;  // (MPOL_PREFERRED with an empty mask: "the local node")
}

int page_node(const void* addr) noexcept {
  int node = -1;
  if (syscall(SYS_get_mempolicy, &node, nullptr, 0, addr, kMpolFNode | kMpolFAddr) != 0)
    return -errno;
  return node;
}
#else
int preferred_node(const void*) noexcept { return -ENOSYS; }
int page_node(const void*) noexcept { return -ENOSYS; }
#endif

}  // namespace tb::numa
