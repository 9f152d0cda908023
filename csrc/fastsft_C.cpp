// fastsft._C: the optional native extension.
//
// Plain C++17 against the CPython API (no torch or numpy headers) so it builds in pip's isolated build
// environment. Arrays cross the boundary through the buffer protocol. Each native function has a
// pure-Python twin (fastsft/data/packing.py) that gives the bit-identical result.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#ifdef _MSC_VER
#include <intrin.h>
#endif

namespace {

// Bumped whenever a native function's signature or semantics change, so that fastsft/_native.py
// can refuse a stale build instead of calling into it with the wrong contract.
// 2: best_fit_pack.
constexpr long kAbiVersion = 2;

// The free-space tables are dense over 0..max_tokens (8 bytes per value), so max_tokens is bounded;
// 2^24 tokens per micro-batch is far beyond what fits in any accelerator's memory for training.
// Must match MAX_SUPPORTED_MAX_TOKENS in fastsft/data/packing.py.
constexpr int64_t kMaxSupportedMaxTokens = int64_t{1} << 24;

PyObject* abi_version(PyObject*, PyObject*) { return PyLong_FromLong(kAbiVersion); }

// Index of the lowest set bit of a nonzero word.
inline int lowest_set_bit(uint64_t word) {
#ifdef _MSC_VER
    unsigned long index;
    _BitScanForward64(&index, word);
    return static_cast<int>(index);
#else
    return __builtin_ctzll(word);
#endif
}

// ------------------------------------------------------------------------------------------------
// Buffers
// ------------------------------------------------------------------------------------------------

// Owns a Py_buffer for the duration of a call (released on every exit path).
struct BufferView {
    Py_buffer view{};
    bool acquired = false;
    ~BufferView() {
        if (acquired) PyBuffer_Release(&view);
    }
    int64_t* data() const { return static_cast<int64_t*>(view.buf); }
    Py_ssize_t size() const { return view.shape[0]; }
};

bool is_native_int64_format(const char* format) {
    // The struct-module codes of a native 8-byte signed integer ("l" on LP64, "q" everywhere), with an
    // optional native-order prefix; numpy's int64 exports "l" (Linux) or "q" (Windows). Explicit
    // byte orders other than the native one are refused.
    if (format == nullptr) return false;  // NULL means "B" (unsigned bytes)
    if (*format == '@' || *format == '=') ++format;
#if PY_LITTLE_ENDIAN
    else if (*format == '<') ++format;
#else
    else if (*format == '>' || *format == '!') ++format;
#endif
    return (format[0] == 'q' || format[0] == 'l') && format[1] == '\0';
}

// Acquires `obj` as a 1-D C-contiguous int64 buffer of `expected_size` elements (any size when
// expected_size < 0). On failure sets a Python exception naming `name` and returns false.
bool get_int64_vector(PyObject* obj, const char* name, bool writable, Py_ssize_t expected_size,
                      BufferView& out) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &out.view, flags) != 0) {
        // The exporter's own message says why (not a buffer, not contiguous, read-only); prefix ours.
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        PyObject* reason = value != nullptr ? PyObject_Str(value) : nullptr;
        const char* reason_text = reason != nullptr ? PyUnicode_AsUTF8(reason) : nullptr;
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous%s int64 buffer (e.g. a numpy array): %s",
                     name, writable ? " writable" : "", reason_text != nullptr ? reason_text : "no detail");
        Py_XDECREF(reason);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        return false;
    }
    out.acquired = true;
    if (out.view.ndim != 1) {
        PyErr_Format(PyExc_ValueError, "%s must be 1-D, got %d dimensions", name, out.view.ndim);
        return false;
    }
    if (out.view.itemsize != 8 || !is_native_int64_format(out.view.format)) {
        PyErr_Format(PyExc_TypeError, "%s must hold int64 (format 'q' or 'l', 8 bytes), got format '%s' of %zd bytes",
                     name, out.view.format != nullptr ? out.view.format : "B", out.view.itemsize);
        return false;
    }
    if (expected_size >= 0 && out.view.shape[0] != expected_size) {
        PyErr_Format(PyExc_ValueError, "%s must have %zd elements, got %zd", name, expected_size,
                     out.view.shape[0]);
        return false;
    }
    return true;
}

// ------------------------------------------------------------------------------------------------
// Best-fit packing
// ------------------------------------------------------------------------------------------------

// A set of integers in [0, universe) with O(log64 universe) insert, erase and "smallest member >= x":
// a bitset plus summary levels, bit i of level k+1 set iff word i of level k is nonzero.
class SuccessorSet {
   public:
    explicit SuccessorSet(int64_t universe) {
        int64_t bits = universe;
        do {
            int64_t words = (bits + 63) / 64;
            levels_.emplace_back(static_cast<size_t>(words), 0);
            bits = words;
        } while (bits > 1);
    }

    void insert(int64_t value) {
        for (auto& level : levels_) {
            uint64_t& word = level[value >> 6];
            bool was_empty = word == 0;
            word |= uint64_t{1} << (value & 63);
            if (!was_empty) return;  // the levels above already know this word is nonempty
            value >>= 6;
        }
    }

    void erase(int64_t value) {
        for (auto& level : levels_) {
            uint64_t& word = level[value >> 6];
            word &= ~(uint64_t{1} << (value & 63));
            if (word != 0) return;  // the word is still nonempty: the levels above stay as they are
            value >>= 6;
        }
    }

    // Smallest member >= value, or -1 when there is none.
    int64_t successor(int64_t value) const {
        size_t depth = 0;
        // Climb until a word holds a member at or after the position we are looking from.
        for (;; ++depth) {
            if (depth == levels_.size()) return -1;
            const auto& level = levels_[depth];
            int64_t word_index = value >> 6;
            if (word_index >= static_cast<int64_t>(level.size())) return -1;
            uint64_t word = level[word_index] & (~uint64_t{0} << (value & 63));
            if (word != 0) {
                value = (word_index << 6) + lowest_set_bit(word);
                break;
            }
            value = word_index + 1;  // everything in this word is too small: continue after it, one level up
        }
        // Descend, taking the lowest member under each summary bit.
        while (depth > 0) {
            --depth;
            value = (value << 6) + lowest_set_bit(levels_[depth][value]);
        }
        return value;
    }

   private:
    std::vector<std::vector<uint64_t>> levels_;
};

// Best fit over `lengths` in the given order: each document goes to the open bin with the least free
// space that still holds it; among equally free bins, to the one that reached that free space last;
// when none holds it, to a new bin (bins are numbered in the order they open). Writes each
// document's bin to bin_of and returns the number of bins, or -1 - i when document i's length is
// outside [1, max_tokens] (nothing else is then valid).
int64_t best_fit(const int64_t* lengths, int64_t num_docs, int64_t max_tokens, int64_t* bin_of) {
    // Open bins with free space f form a LIFO stack: stack_top[f] is the most recent, stack_below[b]
    // the bin under b. A bin's free space changes on every insertion (lengths >= 1), so "reached this
    // free space last" is "pushed last". Full bins (f == 0) are never pushed: nothing fits them.
    std::vector<int64_t> stack_top(static_cast<size_t>(max_tokens) + 1, -1);
    std::vector<int64_t> stack_below(static_cast<size_t>(num_docs));
    SuccessorSet free_values(max_tokens + 1);  // the f with a nonempty stack
    int64_t num_bins = 0;
    for (int64_t i = 0; i < num_docs; ++i) {
        const int64_t length = lengths[i];
        if (length < 1 || length > max_tokens) return -1 - i;
        int64_t free_space = free_values.successor(length);
        int64_t bin;
        if (free_space < 0) {
            bin = num_bins++;
            free_space = max_tokens - length;
        } else {
            bin = stack_top[free_space];
            stack_top[free_space] = stack_below[bin];
            if (stack_top[free_space] < 0) free_values.erase(free_space);
            free_space -= length;
        }
        bin_of[i] = bin;
        if (free_space > 0) {
            stack_below[bin] = stack_top[free_space];
            if (stack_below[bin] < 0) free_values.insert(free_space);
            stack_top[free_space] = bin;
        }
    }
    return num_bins;
}

const char kBestFitPackDoc[] =
    "best_fit_pack(lengths, max_tokens, bin_offsets, positions) -> int\n\n"
    "Best-fit packing of documents, in the given order, into bins of max_tokens tokens.\n"
    "lengths: int64 [N] (C-contiguous buffer), each in [1, max_tokens], in packing order.\n"
    "bin_offsets: writable int64 [N + 1]; on return bin_offsets[:B + 1] is the CSR offset array.\n"
    "positions: writable int64 [N]; on return positions[bin_offsets[b]:bin_offsets[b + 1]] are the\n"
    "indices into `lengths` of bin b's documents, in insertion order. Bins are numbered in the order\n"
    "they open. Returns B. The GIL is released while packing.";

PyObject* best_fit_pack(PyObject*, PyObject* args) {
    PyObject *lengths_obj, *offsets_obj, *positions_obj;
    long long max_tokens;
    if (!PyArg_ParseTuple(args, "OLOO:best_fit_pack", &lengths_obj, &max_tokens, &offsets_obj, &positions_obj)) {
        return nullptr;
    }
    if (max_tokens < 1 || max_tokens > kMaxSupportedMaxTokens) {
        PyErr_Format(PyExc_ValueError, "max_tokens must be in [1, %lld], got %lld",
                     static_cast<long long>(kMaxSupportedMaxTokens), max_tokens);
        return nullptr;
    }
    BufferView lengths, offsets, positions;
    if (!get_int64_vector(lengths_obj, "lengths", false, -1, lengths)) return nullptr;
    const int64_t num_docs = lengths.size();
    if (!get_int64_vector(offsets_obj, "bin_offsets", true, num_docs + 1, offsets)) return nullptr;
    if (!get_int64_vector(positions_obj, "positions", true, num_docs, positions)) return nullptr;

    int64_t num_bins = 0;
    bool out_of_memory = false;
    Py_BEGIN_ALLOW_THREADS;
    try {
        std::vector<int64_t> bin_of(static_cast<size_t>(num_docs));
        num_bins = best_fit(lengths.data(), num_docs, max_tokens, bin_of.data());
        if (num_bins >= 0) {
            // Counting sort by bin, stable in document order, so each bin lists its documents in the
            // order they were inserted.
            int64_t* bin_offsets = offsets.data();
            std::memset(bin_offsets, 0, sizeof(int64_t) * static_cast<size_t>(num_bins + 1));
            for (int64_t i = 0; i < num_docs; ++i) ++bin_offsets[bin_of[i] + 1];
            for (int64_t b = 0; b < num_bins; ++b) bin_offsets[b + 1] += bin_offsets[b];
            std::vector<int64_t> cursor(bin_offsets, bin_offsets + num_bins);
            int64_t* out = positions.data();
            for (int64_t i = 0; i < num_docs; ++i) out[cursor[bin_of[i]]++] = i;
        }
    } catch (const std::bad_alloc&) {
        out_of_memory = true;
    }
    Py_END_ALLOW_THREADS;

    if (out_of_memory) return PyErr_NoMemory();
    if (num_bins < 0) {
        const int64_t index = -1 - num_bins;
        PyErr_Format(PyExc_ValueError, "lengths[%lld] = %lld is outside [1, max_tokens=%lld]",
                     static_cast<long long>(index), static_cast<long long>(lengths.data()[index]), max_tokens);
        return nullptr;
    }
    return PyLong_FromLongLong(num_bins);
}

PyMethodDef kMethods[] = {
    {"abi_version", abi_version, METH_NOARGS, "ABI version of this build of fastsft._C (int)."},
    {"best_fit_pack", best_fit_pack, METH_VARARGS, kBestFitPackDoc},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "_C", "fastsft native extension (optional).", -1, kMethods,
    nullptr, nullptr, nullptr, nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
