/* The guard's whole-frame impulse pass (engine/guard.py, impulse_pass and _tests) in one compiled function.
 *
 * The same float32 arithmetic as the NumPy pass, operation for operation and in the same order (so the same
 * bits: tests/engine/test_guard.py compares them), fused per pixel instead of one array pass per operation:
 * NumPy's version makes ~80 passes over the frame, this one four. Built without floating-point contraction
 * (no fused multiply-add: -ffp-contract=off) and without fast-math; NumPy's minimum and maximum propagate a NaN,
 * and so do NMIN and NMAX. The column and row averages are SciPy's uniform_filter1d (mode "nearest"): a float64
 * running sum, the first window summed in order, then += entering - leaving, divided by the length, rounded to
 * float32.
 *
 * Only the standard C library and the CPython buffer protocol: no NumPy headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* NumPy's minimum and maximum: a NaN in either gives a NaN (the sum), a tie (-0 and +0) the second operand, as
 * NumPy's; without branches the vectoriser refuses */
#define NMIN(a, b) ((a) < (b) ? (a) : ((a) >= (b) ? (b) : (a) + (b)))
#define NMAX(a, b) ((a) > (b) ? (a) : ((a) <= (b) ? (b) : (a) + (b)))

typedef struct {
    float rm2, rm4, c2, c4, z, z_line, tol, offset, dn_per_e, read2;
    int length, block;
} Params;

static inline float variance(float level, const Params *p) {
    float v = level - p->offset;
    v = NMAX(v, 0.0f);
    v *= p->dn_per_e;
    v += p->read2;
    return v;
}

/* The signed sharpness across one axis (guard._sharpness with its two side neighbours' sum ``total``). */
static inline float axis_t(float f_lo, float hi_f, float slack, float m_lo, float m_hi, float total, float bg,
                           const Params *p) {
    const float var = variance(bg, p);
    float s = total - m_lo;
    s *= p->rm2;
    float up = f_lo - s;
    s = m_hi - total;
    s *= p->rm2;
    float down = hi_f - s;
    s = var * p->c2;
    s += slack;
    s = sqrtf(s);
    up = NMAX(up, 0.0f);
    down = NMAX(down, 0.0f);
    down = up - down;
    return down / s;
}

/* The point and single-axis tests of every pixel. pad: the frame edge-extended by 2 on every side, (h + 4) x
 * (w + 4). Writes t0, t1 (the signed sharpness across each axis), bg0, bg1 (each axis's background) and hits
 * (bit 0: axis 0, bit 1: axis 1, bit 2: point). */
/* one clone per vector width, chosen at load time by the CPU (GCC's function multi-versioning); the same
 * arithmetic in each: no contraction, so AVX2's fused multiply-add is never used */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

CLONES static void tests(const float *restrict pad, Py_ssize_t h, Py_ssize_t w, const Params *restrict p,
                  float *restrict t0, float *restrict t1, float *restrict bg0, float *restrict bg1,
                  uint32_t *restrict hits) {
    const Py_ssize_t pw = w + 4;
    const Params q_ = *p;
    for (Py_ssize_t y = 0; y < h; y++) {
        const float *restrict c = pad + (y + 2) * pw + 2;  /* the pixel (y, 0) */
        float *restrict T0 = t0 + y * w, *restrict T1 = t1 + y * w, *restrict B0 = bg0 + y * w,
              *restrict B1 = bg1 + y * w;
        uint32_t *restrict H = hits + y * w;
        for (Py_ssize_t x = 0; x < w; x++) {
            const float f = c[x];
            /* axis 0: the row's neighbours; axis 1: the column's */
            const float l1 = c[x - 1], r1 = c[x + 1], l2 = c[x - 2], r2 = c[x + 2];
            const float u1 = c[x - pw], d1 = c[x + pw], u2 = c[x - 2 * pw], d2 = c[x + 2 * pw];
            float ab_lo = NMIN(l1, r1), ab_hi = NMAX(l1, r1), cd_lo = NMIN(l2, r2), cd_hi = NMAX(l2, r2);
            float b0 = NMAX(ab_lo, cd_lo);
            float tmp = NMIN(ab_hi, cd_hi);
            b0 += tmp;
            b0 *= 0.5f;
            float lo = NMIN(ab_lo, cd_lo), hi = NMAX(ab_hi, cd_hi);
            ab_lo = NMIN(u1, d1); ab_hi = NMAX(u1, d1); cd_lo = NMIN(u2, d2); cd_hi = NMAX(u2, d2);
            float b1 = NMAX(ab_lo, cd_lo);
            tmp = NMIN(ab_hi, cd_hi);
            b1 += tmp;
            b1 *= 0.5f;
            tmp = NMIN(ab_lo, cd_lo);
            lo = NMIN(lo, tmp);
            tmp = NMAX(ab_hi, cd_hi);
            hi = NMAX(hi, tmp);
            const float f_lo = f - lo, hi_f = hi - f;
            float slack = NMAX(f_lo, hi_f);
            slack *= q_.tol;
            slack *= slack;
            const float m_lo = lo * 2.0f, m_hi = hi * 2.0f;
            const float total0 = l1 + r1;
            const float tk0 = axis_t(f_lo, hi_f, slack, m_lo, m_hi, total0, b0, &q_);
            const float tk1 = axis_t(f_lo, hi_f, slack, m_lo, m_hi, u1 + d1, b1, &q_);
            /* the point test: both axes' four neighbours */
            float bg = b0 + b1;
            bg *= 0.5f;
            float total = total0 + u1;
            total += d1;
            const float m_lo4 = lo * 4.0f, m_hi4 = hi * 4.0f;
            const float var = variance(bg, &q_);
            float s = total - m_lo4;
            s *= q_.rm4;
            float up = f_lo - s;
            s = m_hi4 - total;
            s *= q_.rm4;
            const float down = hi_f - s;
            s = var * q_.c4;
            s += slack;
            s = sqrtf(s);
            up = NMAX(up, down);
            s *= q_.z;
            T0[x] = tk0;
            T1[x] = tk1;
            B0[x] = b0;
            B1[x] = b1;
            H[x] = (uint32_t)(fabsf(tk0) > q_.z) | ((uint32_t)(fabsf(tk1) > q_.z) << 1) | ((uint32_t)(up > s) << 2);
        }
    }
}

/* A pixel on a bad line: the average along the line beyond z_line, of the pixel's sign, and the pixel beyond z
 * of the noise from its background. */
static inline uint32_t line_hit(float along, float t, float f, float bg, const Params *p) {
    const float sigma = sqrtf(variance(bg, p));
    return (uint32_t)(fabsf(along) > p->z_line) & (uint32_t)(t * along > 0.0f) & (uint32_t)(fabsf(f - bg) > sigma * p->z);
}

/* Axis 0's line test: t0 averaged along each column, the running sums restarted for each block of rows as the
 * NumPy pass's (its blocks of block_rows rows, with the halo the average needs). acc: w doubles. */
CLONES static void column_lines(const float *frame, Py_ssize_t h, Py_ssize_t w, const Params *p, const float *t0,
                         const float *bg0, uint32_t *hits, double *acc) {
    const Py_ssize_t before = p->length / 2, after = p->length - p->length / 2 - 1, halo = p->length / 2;
    const Py_ssize_t block = p->block;
    const double n = (double)p->length;
    for (Py_ssize_t y0 = 0; y0 < h; y0 += block) {
        const Py_ssize_t y1 = y0 + block < h ? y0 + block : h;
        const Py_ssize_t a = y0 - halo > 0 ? y0 - halo : 0, b = y1 + halo < h ? y1 + halo : h;
        for (Py_ssize_t x = 0; x < w; x++) acc[x] = 0.0;
        for (Py_ssize_t k = -before; k <= after; k++) {
            const Py_ssize_t r = a + k < a ? a : (a + k > b - 1 ? b - 1 : a + k);
            const float *row = t0 + r * w;
            for (Py_ssize_t x = 0; x < w; x++) acc[x] += (double)row[x];
        }
        for (Py_ssize_t y = a; y < y1; y++) {
            if (y > a) {
                Py_ssize_t enter = y + after, leave = y - before - 1;
                enter = enter > b - 1 ? b - 1 : enter;
                leave = leave < a ? a : leave;
                const float *in = t0 + enter * w, *out = t0 + leave * w;
                for (Py_ssize_t x = 0; x < w; x++) acc[x] += (double)in[x] - (double)out[x];
            }
            if (y < y0) continue;
            const float *T = t0 + y * w, *F = frame + y * w, *B = bg0 + y * w;
            uint32_t *H = hits + y * w;
            for (Py_ssize_t x = 0; x < w; x++) {
                const float along = (float)(acc[x] / n);
                H[x] |= line_hit(along, T[x], F[x], B[x], p);
            }
        }
    }
}

/* Axis 1's line test: t1 averaged along each row. */
static void row_lines(const float *frame, Py_ssize_t h, Py_ssize_t w, const Params *p, const float *t1,
                      const float *bg1, uint32_t *hits) {
    const Py_ssize_t before = p->length / 2, after = p->length - p->length / 2 - 1;
    const double n = (double)p->length;
    for (Py_ssize_t y = 0; y < h; y++) {
        const float *T = t1 + y * w, *F = frame + y * w, *B = bg1 + y * w;
        uint32_t *H = hits + y * w;
        double acc = 0.0;
        for (Py_ssize_t k = -before; k <= after; k++) acc += (double)T[k < 0 ? 0 : (k > w - 1 ? w - 1 : k)];
        for (Py_ssize_t x = 0; x < w; x++) {
            if (x > 0) {
                Py_ssize_t enter = x + after, leave = x - before - 1;
                enter = enter > w - 1 ? w - 1 : enter;
                leave = leave < 0 ? 0 : leave;
                acc += (double)T[enter] - (double)T[leave];
            }
            const float along = (float)(acc / n);
            H[x] |= line_hit(along, T[x], F[x], B[x], p) << 1;
        }
    }
}

static int check(Py_buffer *b, Py_ssize_t bytes, const char *what) {
    if (b->len != bytes || !PyBuffer_IsContiguous(b, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s: %zd contiguous bytes expected, got %zd", what, bytes, b->len);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(impulse_pass_doc,
"impulse_pass(padded, frame, h, w, mask, background, scratch, acc, rm2, rm4, c2, c4, z, z_line, tol, offset,\n"
"             dn_per_e, read2, length, block_rows)\n\n"
"engine.guard.impulse_pass's arithmetic: padded (h + 4, w + 4) float32 (the frame edge-extended by 2), frame\n"
"(h, w) float32; writes mask (h, w) uint8 0/1 and background (h, w) float32. scratch: 5 h w 32-bit words\n"
"(4 h w float32, h w uint32); acc: w float64. block_rows: the NumPy pass's blocks, whose column sums restart.");

static PyObject *impulse_pass(PyObject *self, PyObject *args) {
    Py_buffer pad, frame, mask, background, scratch, acc;
    Py_ssize_t h, w;
    Params p;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*nnw*w*w*w*ffffffffffii", &pad, &frame, &h, &w, &mask, &background, &scratch,
                          &acc, &p.rm2, &p.rm4, &p.c2, &p.c4, &p.z, &p.z_line, &p.tol, &p.offset, &p.dn_per_e,
                          &p.read2, &p.length, &p.block))
        return NULL;
    PyObject *result = NULL;
    /* sizes whose byte counts (up to 20 h w and (h + 4)(w + 4) 4) cannot overflow */
    const int sized = h >= 1 && w >= 1 && w <= PY_SSIZE_T_MAX / 32 && h <= (PY_SSIZE_T_MAX / 32) / (w + 4);
    const Py_ssize_t n = sized ? h * w : 0;
    if (!sized || p.length < 1 || p.block < 1) {
        PyErr_SetString(PyExc_ValueError, "h, w, length and block_rows must be >= 1 (and h w a frame's size)");
    } else if (check(&pad, (h + 4) * (w + 4) * 4, "padded") && check(&frame, n * 4, "frame") &&
               check(&mask, n, "mask") && check(&background, n * 4, "background") &&
               check(&scratch, n * 20, "scratch") && check(&acc, w * 8, "acc")) {
        float *t0 = (float *)scratch.buf, *t1 = t0 + n, *bg0 = t1 + n, *bg1 = bg0 + n;
        uint32_t *hits = (uint32_t *)(bg1 + n);
        const float *f = (const float *)frame.buf;
        float *out = (float *)background.buf;
        uint8_t *m = (uint8_t *)mask.buf;
        Py_BEGIN_ALLOW_THREADS
        tests((const float *)pad.buf, h, w, &p, t0, t1, bg0, bg1, hits);
        if (p.length > 1) {
            column_lines(f, h, w, &p, t0, bg0, hits, (double *)acc.buf);
            row_lines(f, h, w, &p, t1, bg1, hits);
        }
        for (Py_ssize_t i = 0; i < n; i++) {  /* a line pixel is replaced from across the line, a point from both */
            const uint32_t hit = hits[i];
            const int a0 = hit & 1u, a1 = (hit >> 1) & 1u;
            m[i] = hit != 0;
            if (a0 && !a1) {
                out[i] = bg0[i];
            } else if (a1 && !a0) {
                out[i] = bg1[i];
            } else {
                float bg = bg0[i] + bg1[i];
                bg *= 0.5f;
                out[i] = bg;
            }
        }
        Py_END_ALLOW_THREADS
        Py_INCREF(Py_None);
        result = Py_None;
    }
    PyBuffer_Release(&pad);
    PyBuffer_Release(&frame);
    PyBuffer_Release(&mask);
    PyBuffer_Release(&background);
    PyBuffer_Release(&scratch);
    PyBuffer_Release(&acc);
    return result;
}

static PyMethodDef methods[] = {
    {"impulse_pass", impulse_pass, METH_VARARGS, impulse_pass_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_impulse", "The guard's whole-frame impulse pass, compiled (engine/_impulse.c).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__impulse(void) { return PyModule_Create(&module); }
