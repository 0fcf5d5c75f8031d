// Raw-array file IO and exactly-sized buffers for the shim drivers (test-only).
// Buffers are allocated with the exact byte count (plus an optional one-element offset to test
// misaligned bases) so that AddressSanitizer flags any read or write past either end.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

namespace nf_io {

[[noreturn]] inline void die(const std::string& msg) {
  std::fprintf(stderr, "driver error: %s\n", msg.c_str());
  std::exit(2);
}

// A heap buffer of `bytes` bytes starting `offset` bytes after a 16-byte aligned allocation.
struct Buffer {
  unsigned char* base = nullptr;
  size_t bytes = 0;
  size_t offset = 0;
  Buffer() = default;
  Buffer(size_t n, size_t off) : bytes(n), offset(off) {
    base = static_cast<unsigned char*>(::operator new[](n + off ? n + off : 1, std::align_val_t(16)));
    std::memset(base, 0, n + off ? n + off : 1);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : base(o.base), bytes(o.bytes), offset(o.offset) { o.base = nullptr; }
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(base, o.base);
    bytes = o.bytes;
    offset = o.offset;
    return *this;
  }
  ~Buffer() {
    if (base) ::operator delete[](base, std::align_val_t(16));
  }
  void* data() const { return base + offset; }
  template <typename T>
  T* as() const { return reinterpret_cast<T*>(base + offset); }
};

inline Buffer read_file(const std::string& path, size_t expected_bytes, size_t offset = 0) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) die("cannot open " + path);
  Buffer b(expected_bytes, offset);
  const size_t got = expected_bytes ? std::fread(b.data(), 1, expected_bytes, f) : 0;
  std::fclose(f);
  if (got != expected_bytes) die("short read " + path);
  return b;
}

inline void write_file(const std::string& path, const void* data, size_t bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) die("cannot write " + path);
  if (bytes && std::fwrite(data, 1, bytes, f) != bytes) die("short write " + path);
  std::fclose(f);
}

}  // namespace nf_io
