/* The frame path's whole-frame conversions, compiled: the network input of an integer frame, the output cast
 * back to the camera's integer type, and the defect probability as the wire's uint8.
 *
 * Each is NumPy's arithmetic (engine/normalise.py network_input and to_dtype, engine/protocol.py
 * defect_map_to_wire), operation for operation in float32, fused into one pass over the frame instead of NumPy's
 * three to five passes with a frame-sized temporary each (the same bits: tests/engine/test_frame_path.py compares
 * them). Built without floating-point contraction and without fast-math (pyproject.toml), so a * b + c is two
 * roundings, as NumPy's. NaN, which NumPy casts to an integer in a way of its own, is never cast here: the casts
 * return how many NaN they met and the caller redoes such a frame in NumPy.
 *
 * Only the standard C library and the CPython buffer protocol: no NumPy headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

/* one clone per vector width, chosen at load time by the CPU (GCC's function multi-versioning) */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* x0 = (float(v) - offset) * inv_scale; x1 = float(v) >= threshold (1.0 or 0.0; all 0.0 without a threshold) */
#define NORMALISE(NAME, T)                                                                                          \
    CLONES static void NAME(const T *restrict v, Py_ssize_t n, float offset, float inv_scale, float threshold,    \
                            int saturates, float *restrict x0, float *restrict x1) {                              \
        for (Py_ssize_t i = 0; i < n; i++) {                                                                       \
            const float f = (float)v[i];                                                                           \
            const float d = f - offset;                                                                            \
            x0[i] = d * inv_scale;                                                                                 \
            x1[i] = saturates ? (f >= threshold ? 1.0f : 0.0f) : 0.0f;                                            \
        }                                                                                                          \
    }
NORMALISE(normalise_u8, uint8_t)
NORMALISE(normalise_u16, uint16_t)
NORMALISE(normalise_i16, int16_t)

/* numpy's clip of float32 for a non-NaN x: max(x, lo) then min(., hi) */
static inline float clip(float x, float lo, float hi) {
    const float r = x > lo ? x : lo;
    return r < hi ? r : hi;
}

/* out = T(clip(rint(src), lo, hi)); returns the NaN met (their outputs are 0: the caller redoes the frame) */
#define TO_INTEGER(NAME, T)                                                                                         \
    CLONES static Py_ssize_t NAME(const float *restrict src, Py_ssize_t n, float lo, float hi, T *restrict out) { \
        Py_ssize_t nan = 0;                                                                                        \
        for (Py_ssize_t i = 0; i < n; i++) {                                                                       \
            const float s = src[i];                                                                                \
            const int is_nan = s != s;                                                                             \
            nan += is_nan;                                                                                         \
            out[i] = is_nan ? (T)0 : (T)clip(rintf(s), lo, hi);                                                    \
        }                                                                                                          \
        return nan;                                                                                                \
    }
TO_INTEGER(to_u8, uint8_t)
TO_INTEGER(to_u16, uint16_t)
TO_INTEGER(to_i16, int16_t)
TO_INTEGER(to_i32, int32_t)

/* out = uint8(rint(clip(p, 0, 1) * 255)); returns the NaN met */
CLONES static Py_ssize_t probability_u8(const float *restrict p, Py_ssize_t n, uint8_t *restrict out) {
    Py_ssize_t nan = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const float s = p[i];
        const int is_nan = s != s;
        nan += is_nan;
        out[i] = is_nan ? (uint8_t)0 : (uint8_t)rintf(clip(s, 0.0f, 1.0f) * 255.0f);
    }
    return nan;
}

static int check(Py_buffer *b, Py_ssize_t bytes, const char *what) {
    if (b->len != bytes || !PyBuffer_IsContiguous(b, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s: %zd contiguous bytes expected, got %zd", what, bytes, b->len);
        return 0;
    }
    return 1;
}

static int element_size(int kind) {
    switch (kind) {
    case 'B': return 1;
    case 'H': case 'h': return 2;
    case 'i': return 4;
    default: return 0;
    }
}

PyDoc_STRVAR(normalise_doc,
"normalise(frame, kind, offset, inv_scale, threshold, saturates, x0, x1)\n\n"
"engine.normalise.network_input's pixel pass for an integer frame, the same bits: x0 = (float32(v) - offset) *\n"
"inv_scale, x1 = float32(v) >= threshold (1.0 or 0.0; 0.0 everywhere unless saturates). frame: n elements of\n"
"kind 'B' (uint8), 'H' (uint16) or 'h' (int16); x0, x1: n float32; offset, inv_scale, threshold: float32.");

static PyObject *normalise(PyObject *self, PyObject *args) {
    Py_buffer v, x0, x1;
    int kind, saturates;
    float offset, inv_scale, threshold;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*Cfffpw*w*", &v, &kind, &offset, &inv_scale, &threshold, &saturates, &x0, &x1))
        return NULL;
    PyObject *result = NULL;
    const int size = kind == 'i' ? 0 : element_size(kind);
    if (size == 0) {
        PyErr_Format(PyExc_ValueError, "frame kind %c: 'B', 'H' or 'h' expected", kind);
    } else {
        const Py_ssize_t n = v.len / size;
        if (v.len % size == 0 && check(&v, n * size, "frame") && check(&x0, n * 4, "x0") && check(&x1, n * 4, "x1")) {
            Py_BEGIN_ALLOW_THREADS
            if (kind == 'B')
                normalise_u8((const uint8_t *)v.buf, n, offset, inv_scale, threshold, saturates, x0.buf, x1.buf);
            else if (kind == 'H')
                normalise_u16((const uint16_t *)v.buf, n, offset, inv_scale, threshold, saturates, x0.buf, x1.buf);
            else
                normalise_i16((const int16_t *)v.buf, n, offset, inv_scale, threshold, saturates, x0.buf, x1.buf);
            Py_END_ALLOW_THREADS
            Py_INCREF(Py_None);
            result = Py_None;
        } else if (v.len % size) {
            PyErr_SetString(PyExc_ValueError, "frame: a whole number of elements expected");
        }
    }
    PyBuffer_Release(&v);
    PyBuffer_Release(&x0);
    PyBuffer_Release(&x1);
    return result;
}

PyDoc_STRVAR(to_integer_doc,
"to_integer(src, lo, hi, kind, out) -> NaN count\n\n"
"engine.normalise.to_dtype for an integer camera type, the same bits where src holds no NaN: out =\n"
"kind(clip(rint(src), lo, hi)). src: n float32; lo, hi: float32 bounds that kind holds; out: n elements of kind\n"
"'B' (uint8), 'H' (uint16), 'h' (int16) or 'i' (int32). Returns how many NaN src held (their outputs are 0, not\n"
"NumPy's: redo such a frame in NumPy).");

static PyObject *to_integer(PyObject *self, PyObject *args) {
    Py_buffer src, out;
    float lo, hi;
    int kind;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*ffCw*", &src, &lo, &hi, &kind, &out))
        return NULL;
    PyObject *result = NULL;
    const int size = element_size(kind);
    const Py_ssize_t n = src.len / 4;
    if (size == 0) {
        PyErr_Format(PyExc_ValueError, "output kind %c: 'B', 'H', 'h' or 'i' expected", kind);
    } else if (src.len % 4 == 0 && check(&src, n * 4, "src") && check(&out, n * size, "out")) {
        Py_ssize_t nan = 0;
        const float *s = (const float *)src.buf;
        Py_BEGIN_ALLOW_THREADS
        switch (kind) {
        case 'B': nan = to_u8(s, n, lo, hi, (uint8_t *)out.buf); break;
        case 'H': nan = to_u16(s, n, lo, hi, (uint16_t *)out.buf); break;
        case 'h': nan = to_i16(s, n, lo, hi, (int16_t *)out.buf); break;
        default: nan = to_i32(s, n, lo, hi, (int32_t *)out.buf); break;
        }
        Py_END_ALLOW_THREADS
        result = PyLong_FromSsize_t(nan);
    } else if (src.len % 4) {
        PyErr_SetString(PyExc_ValueError, "src: float32 expected");
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(probability_doc,
"probability_to_uint8(p, out) -> NaN count\n\n"
"engine.protocol.defect_map_to_wire's uint8 map, the same bits where p holds no NaN: out = uint8(rint(clip(p, 0,\n"
"1) * 255)). p: n float32; out: n uint8. Returns how many NaN p held (redo such a map in NumPy).");

static PyObject *probability_to_uint8(PyObject *self, PyObject *args) {
    Py_buffer p, out;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*", &p, &out))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t n = p.len / 4;
    if (p.len % 4 == 0 && check(&p, n * 4, "p") && check(&out, n, "out")) {
        Py_ssize_t nan;
        Py_BEGIN_ALLOW_THREADS
        nan = probability_u8((const float *)p.buf, n, (uint8_t *)out.buf);
        Py_END_ALLOW_THREADS
        result = PyLong_FromSsize_t(nan);
    } else if (p.len % 4) {
        PyErr_SetString(PyExc_ValueError, "p: float32 expected");
    }
    PyBuffer_Release(&p);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"normalise", normalise, METH_VARARGS, normalise_doc},
    {"to_integer", to_integer, METH_VARARGS, to_integer_doc},
    {"probability_to_uint8", probability_to_uint8, METH_VARARGS, probability_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_frame", "The frame path's whole-frame conversions, compiled (engine/_frame.c).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__frame(void) { return PyModule_Create(&module); }
