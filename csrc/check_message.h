// Error messages for the op's argument checks, built without std::ostream.
//
// Why: on the H100 machine (GCC 13, C++20, torch 2.11) the extension's own instantiation of
// std::ostream::_M_insert<long> (pulled in by c10::str when a TORCH_CHECK message streams an integer or a
// shape) segfaulted inside the locale facet lookup, so a bad argument crashed the process instead of
// raising. Building the text by string concatenation and handing TORCH_CHECK one std::string (which
// c10::str passes through untouched) keeps every error path off iostreams.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

namespace moelora {
namespace detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, std::string_view v) { s.append(v.data(), v.size()); }
inline void append(std::string& s, bool v) { s += v ? "True" : "False"; }
inline void append(std::string& s, c10::IntArrayRef v) {  // "[2, 3]", as torch prints sizes
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, c10::ScalarType v) { s += "torch." + std::string(c10::getDtypeNames(v).first); }
template <typename T, typename = std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>>>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}

}  // namespace detail

// Concatenates strings, integers, bools (True/False), shapes, devices and dtypes into one message.
template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace moelora

// TORCH_CHECK with an ostream-free message: raises c10::Error (RuntimeError in Python) when cond is false.
#define MOELORA_CHECK(cond, ...)                                \
  do {                                                          \
    if (C10_UNLIKELY(!(cond))) {                                \
      TORCH_CHECK(false, ::moelora::message(__VA_ARGS__));      \
    }                                                           \
  } while (0)
