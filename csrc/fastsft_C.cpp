// fastsft._C: the optional native extension.
//
// Plain C++ against the CPython API (no torch headers) so it builds in pip's isolated build
// environment. The data path's hot loops (best-fit-decreasing packing) land here with the packing
// issue; each native function has a pure-Python twin that gives the identical result.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace {

// Bumped whenever a native function's signature or semantics change, so that fastsft/_native.py
// can refuse a stale build instead of calling into it with the wrong contract.
constexpr long kAbiVersion = 1;

PyObject* abi_version(PyObject*, PyObject*) { return PyLong_FromLong(kAbiVersion); }

PyMethodDef kMethods[] = {
    {"abi_version", abi_version, METH_NOARGS, "ABI version of this build of fastsft._C (int)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "_C", "fastsft native extension (optional).", -1, kMethods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
