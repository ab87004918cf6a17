#include "core/host_ceiling.h"

#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "core/event.h"
#include "core/strided_copy.h"

namespace tb {

std::vector<double> host_copy_seconds(TransferEngine& engine, size_t nbytes, bool to_pinned,
                                      int repeats) {
  if (nbytes == 0 || repeats < 1 || repeats > 10000)
    throw std::invalid_argument("host ceiling: nbytes must be positive, repeats 1 to 10000");
  PinnedMemory pinned = alloc_pinned(engine, nbytes);
  std::unique_ptr<char[]> pageable(new char[nbytes]);
  std::memset(pageable.get(), 1, nbytes);  // (touched, as a user's array would be)
  std::memset(pinned.get(), 2, nbytes);
  char* dst = to_pinned ? static_cast<char*>(pinned.get()) : pageable.get();
  char* src = to_pinned ? pageable.get() : static_cast<char*>(pinned.get());
  const int64_t shape[1] = {static_cast<int64_t>(nbytes)};
  const int64_t stride[1] = {1};
  auto copy = [&] {
    if (!strided_copy({dst, stride}, {src, stride}, shape, 1, 1))
      throw std::runtime_error("host ceiling: copy refused");
  };
  copy();  // warm-up: threads started, pages mapped
  std::vector<double> seconds;
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    copy();
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return seconds;
}

}  // namespace tb
