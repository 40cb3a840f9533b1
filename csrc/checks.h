// Argument checks and the float32/float64 dispatch of the CPU extensions, written once. Every
// error is one line "<function>: <what>": a ValueError for shape, layout and values, a TypeError
// for dtypes. Each extension keeps its own wording of the shape messages (they name its
// arguments' roles); the checks here take the function and argument names and word the rest.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>

namespace checks {

namespace py = pybind11;

[[noreturn]] inline void value_error(const char* fn, const std::string& what) {
    throw py::value_error(std::string(fn) + ": " + what);
}

[[noreturn]] inline void type_error(const char* fn, const std::string& what) {
    throw py::type_error(std::string(fn) + ": " + what);
}

inline bool is_c_contiguous(const py::array& a) { return (a.flags() & py::array::c_style) != 0; }

// a.shape() == dims (the number of dimensions included).
inline bool has_shape(const py::array& a, std::initializer_list<int64_t> dims) {
    if (a.ndim() != py::ssize_t(dims.size())) return false;
    py::ssize_t d = 0;
    for (int64_t n : dims)
        if (a.shape(d++) != n) return false;
    return true;
}

// "<fn>: <name> has a different dtype than <reference>" unless a has dtype dt.
inline void same_dtype(const char* fn, const py::array& a, const std::string& name, const py::dtype& dt,
                       const char* reference) {
    if (!a.dtype().is(dt)) type_error(fn, name + " has a different dtype than " + reference);
}

// "<fn>: <name> must be <wording>" unless a is C-contiguous (wording: "contiguous" or "C-contiguous").
inline void contiguous(const char* fn, const py::array& a, const std::string& name,
                       const char* wording = "contiguous") {
    if (!is_c_contiguous(a)) value_error(fn, name + " must be " + wording);
}

// "<fn>: <name> must be writable" for an output that is read-only.
inline void writable(const char* fn, const py::array& a, const std::string& name) {
    if (!a.writeable()) value_error(fn, name + " must be writable");
}

// Whether the bytes of a and b overlap (an output must not alias an input).
inline bool overlap(const py::array& a, const py::array& b) {
    const char *a0 = static_cast<const char*>(a.data()), *b0 = static_cast<const char*>(b.data());
    return a.nbytes() > 0 && b.nbytes() > 0 && a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

inline bool is_float32(const py::dtype& dt) { return dt.is(py::dtype::of<float>()); }
inline bool is_float64(const py::dtype& dt) { return dt.is(py::dtype::of<double>()); }

// "<fn>: <name> must be float32 or float64" unless dt is one of them.
inline void float_dtype(const char* fn, const std::string& name, const py::dtype& dt) {
    if (!is_float32(dt) && !is_float64(dt)) type_error(fn, name + " must be float32 or float64");
}

// The dtype dispatch: body(float{}) for float32, body(double{}) for float64 (the body reads the
// element type as decltype of its argument), else the float_dtype error naming `name`.
template <class Body>
void dispatch_float(const char* fn, const std::string& name, const py::dtype& dt, Body&& body) {
    if (is_float32(dt))
        body(float{});
    else if (is_float64(dt))
        body(double{});
    else
        type_error(fn, name + " must be float32 or float64");
}

}  // namespace checks
