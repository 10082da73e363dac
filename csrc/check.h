// NANOBLOCK_CHECK(cond, parts...): raises a c10::Error (a Python
// RuntimeError) whose message is the parts joined, when cond is false.
//
// Like TORCH_CHECK, but the message is built with std::string and
// std::to_string only. TORCH_CHECK formats through an ostringstream compiled
// into this extension, and on the GPU machine (torch 2.11) formatting an
// integer that way crashed inside libstdc++'s locale code once CUDA had been
// used. The message is built only on failure.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace nanoblock {

inline std::string to_text(const char* s) { return s; }
inline std::string to_text(const std::string& s) { return s; }
inline std::string to_text(const c10::Device& d) { return d.str(); }
inline std::string to_text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
std::string to_text(T v) {
  return std::to_string(v);
}

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::string message;
  ((message += to_text(parts)), ...);
  TORCH_CHECK(false, message);
}

}  // namespace nanoblock

#define NANOBLOCK_CHECK(cond, ...)                        \
  do {                                                    \
    if (C10_UNLIKELY(!(cond))) ::nanoblock::fail(__VA_ARGS__); \
  } while (0)
