// A zeroed buffer whose pages are not touched until they are written, for XLA:CPU
// through jax.ffi.
//
// The KV pool is the engine's largest array (1.5 GB at default settings for SmolLM2 in
// f32), and XLA fills a zeroed array by writing every byte: the first write to each page
// costs a page fault, and in a virtual machine the host backs the page then too. That
// took 1.6-3 s at start-up, before the first request could run a step. Here the
// result's whole pages are handed back to the kernel (madvise MADV_DONTNEED: private
// anonymous memory, which XLA:CPU's buffers are, reads back as zero-filled pages), and
// only the partial pages at either end are written: the pool then costs memory as the
// sequences fill it. Anywhere madvise fails, the buffer is written with zeros instead.

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Below this, writing the zeros is cheaper than the system call.
constexpr size_t kReleaseFrom = size_t{1} << 20;

void zero(void* data, size_t bytes) {
  const auto begin = reinterpret_cast<uintptr_t>(data), end = begin + bytes;
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t first = (begin + page - 1) & ~(page - 1), last = end & ~(page - 1);
  if (bytes < kReleaseFrom || first >= last ||
      madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED) != 0) {
    std::memset(data, 0, bytes);
    return;
  }
  std::memset(data, 0, first - begin);
  std::memset(reinterpret_cast<void*>(last), 0, end - last);
}

ffi::Error ZerosImpl(ffi::Result<ffi::AnyBuffer> out) {
  zero(out->untyped_data(), out->size_bytes());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchatZeros, ZerosImpl,
                              ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());
