/* The guard's whole-frame impulse pass (engine/guard.py, impulse_pass and _tests) and its finish, compiled.
 *
 * The same float32 arithmetic as the NumPy pass, operation for operation and in the same order (so the same
 * bits: tests/engine/test_guard.py compares them), fused per pixel instead of one array pass per operation:
 * NumPy's version makes ~80 passes over the frame, this one works a block of rows at a time (its scratch in the
 * CPU's cache); and the guard's last steps (the bound, fills, flags, counts) in one pass. Built without
 * floating-point contraction (no fused multiply-add: -ffp-contract=off) and without fast-math; NumPy's minimum
 * and maximum propagate a NaN, and so do NMIN and NMAX. The column and row averages are SciPy's uniform_filter1d (mode "nearest"): a float64
 * running sum, the first window summed in order, then += entering - leaving, divided by the length, rounded to
 * float32.
 *
 * Only the standard C library and the CPython buffer protocol: no NumPy headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

/* Axis 0's line test for the block of rows [y0, y1): t0 averaged along each column over the block's rows [a, b)
 * (the block and the halo the average needs, clipped to the frame), the running sums restarted for each block as
 * the NumPy pass's (its blocks of block_rows rows). t0, bg0 and hits hold rows [a, b) (row a first); frame the
 * whole frame. acc: w doubles. */
CLONES static void column_lines(const float *frame, Py_ssize_t w, Py_ssize_t a, Py_ssize_t b, Py_ssize_t y0,
                                Py_ssize_t y1, const Params *p, const float *t0, const float *bg0, uint32_t *hits,
                                double *acc) {
    const Py_ssize_t before = p->length / 2, after = p->length - p->length / 2 - 1;
    const double n = (double)p->length;
    for (Py_ssize_t x = 0; x < w; x++) acc[x] = 0.0;
    for (Py_ssize_t k = -before; k <= after; k++) {
        const Py_ssize_t r = a + k < a ? a : (a + k > b - 1 ? b - 1 : a + k);
        const float *row = t0 + (r - a) * w;
        for (Py_ssize_t x = 0; x < w; x++) acc[x] += (double)row[x];
    }
    for (Py_ssize_t y = a; y < y1; y++) {
        if (y > a) {
            Py_ssize_t enter = y + after, leave = y - before - 1;
            enter = enter > b - 1 ? b - 1 : enter;
            leave = leave < a ? a : leave;
            const float *in = t0 + (enter - a) * w, *out = t0 + (leave - a) * w;
            for (Py_ssize_t x = 0; x < w; x++) acc[x] += (double)in[x] - (double)out[x];
        }
        if (y < y0) continue;
        const float *T = t0 + (y - a) * w, *F = frame + y * w, *B = bg0 + (y - a) * w;
        uint32_t *H = hits + (y - a) * w;
        for (Py_ssize_t x = 0; x < w; x++) {
            const float along = (float)(acc[x] / n);
            H[x] |= line_hit(along, T[x], F[x], B[x], p);
        }
    }
}

/* Axis 1's line test of ``rows`` rows: t1 averaged along each. The running sums (SciPy's, each row's in its own
 * order) are the one serial part: ROWS_AT_ONCE rows' side by side (independent chains: one row's adds wait on each
 * other, four rows' do not) into sums (ROWS_AT_ONCE w doubles); the tests on them then vectorise. */
#define ROWS_AT_ONCE 4
static void running_sums(const float *T, Py_ssize_t w, Py_ssize_t m, Py_ssize_t before, Py_ssize_t after,
                         double *sums) {
    double acc[ROWS_AT_ONCE] = {0.0};
    for (Py_ssize_t j = 0; j < m; j++) {
        const float *t = T + j * w;
        for (Py_ssize_t k = -before; k <= after; k++) acc[j] += (double)t[k < 0 ? 0 : (k > w - 1 ? w - 1 : k)];
        sums[j * w] = acc[j];
    }
    for (Py_ssize_t x = 1; x < w; x++) {
        Py_ssize_t enter = x + after, leave = x - before - 1;
        enter = enter > w - 1 ? w - 1 : enter;
        leave = leave < 0 ? 0 : leave;
        for (Py_ssize_t j = 0; j < m; j++) {
            acc[j] += (double)T[j * w + enter] - (double)T[j * w + leave];
            sums[j * w + x] = acc[j];
        }
    }
}

CLONES static void row_hits(const float *F, const float *T, const float *B, const double *sums, Py_ssize_t n_px,
                            const Params *p, uint32_t *H) {
    const double n = (double)p->length;
    for (Py_ssize_t i = 0; i < n_px; i++) {
        const float along = (float)(sums[i] / n);
        H[i] |= line_hit(along, T[i], F[i], B[i], p) << 1;
    }
}

static void row_lines(const float *F, Py_ssize_t w, Py_ssize_t rows, const Params *p, const float *T, const float *B,
                      uint32_t *H, double *sums) {
    const Py_ssize_t before = p->length / 2, after = p->length - p->length / 2 - 1;
    for (Py_ssize_t r0 = 0; r0 < rows; r0 += ROWS_AT_ONCE) {
        const Py_ssize_t m = rows - r0 < ROWS_AT_ONCE ? rows - r0 : ROWS_AT_ONCE, o = r0 * w;
        running_sums(T + o, w, m, before, after, sums);
        row_hits(F + o, T + o, B + o, sums, m * w, p, H + o);
    }
}

/* The pass's output for rows of ``n_px`` pixels: the mask, and the background a hit is replaced with (a line pixel
 * from across the line, a point from both axes), without branches so that it vectorises. */
CLONES static void outputs(const uint32_t *hit, const float *b0, const float *b1, Py_ssize_t n_px, uint8_t *M,
                           float *O) {
    for (Py_ssize_t x = 0; x < n_px; x++) {
        const uint32_t a0 = hit[x] & 1u, a1 = (hit[x] >> 1) & 1u;
        float both = b0[x] + b1[x];
        both *= 0.5f;
        M[x] = hit[x] != 0;
        O[x] = a0 == a1 ? both : (a0 ? b0[x] : b1[x]);
    }
}

/* Rows [y_start, y_end) of the pass, a block of rows at a time (the block's tests, with their halo, then its line
 * tests and its output), so that the scratch (the block's rows) stays in the CPU's cache: the halo's tests are made
 * twice (once for each block that needs them), the same bits each time. scratch: 5 (block + 2 halo) w words. */
static void pass_rows(const float *pad, const float *f, Py_ssize_t h, Py_ssize_t w, Py_ssize_t y_start,
                      Py_ssize_t y_end, const Params *p, float *scratch, double *acc, uint8_t *m, float *out) {
    const Py_ssize_t halo = p->length > 1 ? p->length / 2 : 0, rows = p->block + 2 * halo;
    float *t0 = scratch, *t1 = t0 + rows * w, *bg0 = t1 + rows * w, *bg1 = bg0 + rows * w;
    uint32_t *hits = (uint32_t *)(bg1 + rows * w);
    for (Py_ssize_t y0 = y_start; y0 < y_end; y0 += p->block) {
        const Py_ssize_t y1 = y0 + p->block < h ? y0 + p->block : h;
        const Py_ssize_t a = y0 - halo > 0 ? y0 - halo : 0, b = y1 + halo < h ? y1 + halo : h;
        tests(pad + a * (w + 4), b - a, w, p, t0, t1, bg0, bg1, hits);
        if (p->length > 1) {
            column_lines(f, w, a, b, y0, y1, p, t0, bg0, hits, acc);
            row_lines(f + y0 * w, w, y1 - y0, p, t1 + (y0 - a) * w, bg1 + (y0 - a) * w, hits + (y0 - a) * w, acc);
        }
        outputs(hits + (y0 - a) * w, bg0 + (y0 - a) * w, bg1 + (y0 - a) * w, (y1 - y0) * w, m + y0 * w, out + y0 * w);
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
"             dn_per_e, read2, length, block_rows, y_start, y_end)\n\n"
"engine.guard.impulse_pass's arithmetic on rows [y_start, y_end) (y_start a multiple of block_rows): padded\n"
"(h + 4, w + 4) float32 (the frame edge-extended by 2), frame (h, w) float32; writes those rows of mask (h, w)\n"
"uint8 0/1 and background (h, w) float32. scratch: 5 (block_rows + 2 (length // 2)) w 32-bit words; acc: 4 w\n"
"float64 (both the caller's, one set per thread). block_rows: the NumPy pass's blocks, whose column sums\n"
"restart. The GIL is released: calls on disjoint rows with their own scratch may run at once.");

static PyObject *impulse_pass(PyObject *self, PyObject *args) {
    Py_buffer pad, frame, mask, background, scratch, acc;
    Py_ssize_t h, w, y_start, y_end;
    Params p;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*nnw*w*w*w*ffffffffffiinn", &pad, &frame, &h, &w, &mask, &background,
                          &scratch, &acc, &p.rm2, &p.rm4, &p.c2, &p.c4, &p.z, &p.z_line, &p.tol, &p.offset,
                          &p.dn_per_e, &p.read2, &p.length, &p.block, &y_start, &y_end))
        return NULL;
    PyObject *result = NULL;
    /* sizes whose byte counts (up to 20 (block + length) w and (h + 4)(w + 4) 4) cannot overflow */
    const int sized = h >= 1 && w >= 1 && w <= PY_SSIZE_T_MAX / 32 && h <= (PY_SSIZE_T_MAX / 32) / (w + 4) &&
                      p.length >= 1 && p.block >= 1 && p.length <= (1 << 20) && p.block <= (1 << 20) &&
                      (Py_ssize_t)p.block + p.length <= (PY_SSIZE_T_MAX / 32) / (w + 4);
    const Py_ssize_t n = sized ? h * w : 0;
    const Py_ssize_t rows = sized ? p.block + 2 * (p.length > 1 ? p.length / 2 : 0) : 0;
    if (!sized) {
        PyErr_SetString(PyExc_ValueError, "h, w, length and block_rows must be >= 1 (and h w a frame's size)");
    } else if (y_start < 0 || y_start > y_end || y_end > h || y_start % p.block || (y_end != h && y_end % p.block)) {
        PyErr_SetString(PyExc_ValueError, "rows: 0 <= y_start <= y_end <= h, each a multiple of block_rows (or h)");
    } else if (check(&pad, (h + 4) * (w + 4) * 4, "padded") && check(&frame, n * 4, "frame") &&
               check(&mask, n, "mask") && check(&background, n * 4, "background") &&
               check(&scratch, rows * w * 20, "scratch") && check(&acc, ROWS_AT_ONCE * w * 8, "acc")) {
        Py_BEGIN_ALLOW_THREADS
        pass_rows((const float *)pad.buf, (const float *)frame.buf, h, w, y_start, y_end, &p, (float *)scratch.buf,
                  (double *)acc.buf, (uint8_t *)mask.buf, (float *)background.buf);
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

/* numpy's clip of float32 (numpy/_core/src/umath/clip.cpp): max(x, lo) keeping a NaN x, else x > lo ? x : lo;
 * then min(., hi) alike. NMAX and NMIN give those numbers for a non-NaN x (a NaN bound comes out as that NaN: lo
 * and hi are NaN together, from one NaN frame pixel or bound, with one payload), and a NaN x is kept as it is,
 * payload and all, by the last select; in that form it vectorises. */
static inline float np_clip(float x, float lo, float hi) {
    float r = NMAX(x, lo);
    r = NMIN(r, hi);
    return x != x ? x : r;
}

/* The class codes (SATURATED 2 where not an impulse, IMPULSE 3, LEARNED 4, else 0): bytes alone, so that it
 * vectorises. */
CLONES static void finish_codes(const uint8_t *restrict imp, const uint8_t *restrict sat,
                                const uint8_t *restrict learned, Py_ssize_t n, uint8_t *restrict flags) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t m = imp[i] != 0, s = sat[i] != 0, l = learned[i] != 0;
        const uint8_t code = (uint8_t)(l * 4), code2 = m ? 3 : code;
        flags[i] = (s & (m ^ 1)) ? 2 : code2;
    }
}

/* The output by class code: 32-bit lanes throughout (the code widened), so that it vectorises. */
CLONES static void finish_px(const float *restrict f, const float *restrict den, const float *restrict bg,
                             const uint8_t *restrict flags, Py_ssize_t n, float k, float offset, float dn_per_e,
                             float read2, float *restrict out) {
    Params p;
    p.offset = offset;
    p.dn_per_e = dn_per_e;
    p.read2 = read2;
    for (Py_ssize_t i = 0; i < n; i++) {
        const float fi = f[i], di = den[i], bi = bg[i];
        const int c = flags[i];
        const float sigma = sqrtf(variance(fi, &p));
        const float bound = sigma * k;  /* k 1: sigma, to the bit (numpy's path skips the product) */
        const float clipped = np_clip(di, fi - bound, fi + bound);
        out[i] = c == 2 ? fi : (c == 3 ? bi : (c == 4 ? di : clipped));
    }
}

PyDoc_STRVAR(finish_doc,
"finish(frame, denoised, impulses, background, saturated, learned, k, offset, dn_per_e, read2, out, flags)\n\n"
"engine.guard._guard's last steps in one pass, the same bits: out = denoised clipped to frame +- k sigma(frame)\n"
"(sigma from the noise model offset, dn_per_e, read2 = read_dn^2; k 1: sigma itself), then denoised where learned,\n"
"background where impulses, frame where saturated and not an impulse; flags the class codes (SATURATED 2,\n"
"IMPULSE 3, LEARNED 4, else 0). frame, denoised, background, out: n float32; the masks and flags n uint8 0/1.\n"
"learned must exclude impulses and saturated pixels (as the guard's does). Returns (saturated, impulses,\n"
"learned): each class's pixels.");

static PyObject *finish(PyObject *self, PyObject *args) {
    Py_buffer f, den, imp, bg, sat, learned, out, flags;
    float k, offset, dn_per_e, read2;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*ffffw*w*", &f, &den, &imp, &bg, &sat, &learned, &k, &offset, &dn_per_e,
                          &read2, &out, &flags))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t n = f.len / 4;
    if (f.len % 4 == 0 && check(&f, n * 4, "frame") && check(&den, n * 4, "denoised") && check(&imp, n, "impulses") &&
        check(&bg, n * 4, "background") && check(&sat, n, "saturated") && check(&learned, n, "learned") &&
        check(&out, n * 4, "out") && check(&flags, n, "flags")) {
        Py_ssize_t counts[5] = {0, 0, 0, 0, 0};
        const uint8_t *fl = (const uint8_t *)flags.buf;
        Py_BEGIN_ALLOW_THREADS
        finish_codes((const uint8_t *)imp.buf, (const uint8_t *)sat.buf, (const uint8_t *)learned.buf, n,
                     (uint8_t *)flags.buf);
        finish_px((const float *)f.buf, (const float *)den.buf, (const float *)bg.buf, fl, n, k, offset, dn_per_e,
                  read2, (float *)out.buf);
        for (Py_ssize_t i = 0; i < n; i++) {  /* 0, 2, 3 or 4: just written; sums vectorise, a histogram does not */
            counts[2] += fl[i] == 2;
            counts[3] += fl[i] == 3;
            counts[4] += fl[i] == 4;
        }
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("nnn", counts[2], counts[3], counts[4]);
    } else if (f.len % 4) {
        PyErr_SetString(PyExc_ValueError, "frame: float32 expected");
    }
    PyBuffer_Release(&f);
    PyBuffer_Release(&den);
    PyBuffer_Release(&imp);
    PyBuffer_Release(&bg);
    PyBuffer_Release(&sat);
    PyBuffer_Release(&learned);
    PyBuffer_Release(&out);
    PyBuffer_Release(&flags);
    return result;
}

/* ---- The guard's noise model (engine/guard.py measure_noise and fit_noise), its samples and level bins ---- */

/* measure_noise's samples: for each used block row r (1, 1 + stride, ... < by - 1) and block column j, the
 * block's level (its mean), its second difference across and down (diff) and the structure beside it (the
 * same difference's size on the blocks above and below), with NumPy's operations in NumPy's order. ex: the
 * (by, bx) blocks holding an excluded pixel, or NULL; a sample whose block or either neighbour holds one is left
 * out. Returns the samples written, in NumPy's order (row-major over (rows, bx)). */
static inline float block_d(const float *f, Py_ssize_t w, Py_ssize_t r, Py_ssize_t j) {
    float a[3];
    for (int p = 0; p < 3; p++) {
        const float *q = f + (3 * r + p) * w + 3 * j;
        float t = 2.0f * q[1];
        t = q[0] - t;
        a[p] = t + q[2];
    }
    float t = 2.0f * a[1];
    t = a[0] - t;
    t = t + a[2];
    return t * (float)(1.0 / 6.0);
}

static Py_ssize_t samples(const float *f, Py_ssize_t w, Py_ssize_t by, Py_ssize_t bx, Py_ssize_t stride,
                          const uint8_t *ex, float *level, float *diff, float *structure) {
    Py_ssize_t n = 0;
    for (Py_ssize_t r = 1; r < by - 1; r += stride) {
        for (Py_ssize_t j = 0; j < bx; j++) {
            if (ex && (ex[r * bx + j] | ex[(r - 1) * bx + j] | ex[(r + 1) * bx + j]))
                continue;
            float s[3];
            for (int p = 0; p < 3; p++) {
                const float *q = f + (3 * r + p) * w + 3 * j;
                float t = q[0] + q[1];
                s[p] = t + q[2];
            }
            float t = s[0] + s[1];
            t = t + s[2];
            level[n] = t * (float)(1.0 / 9.0);
            diff[n] = block_d(f, w, r, j);
            float up = fabsf(block_d(f, w, r - 1, j)), down = fabsf(block_d(f, w, r + 1, j));
            structure[n] = up + down;
            n++;
        }
    }
    return n;
}

/* guard._stable_argsort's key: order-preserving, -0 as +0, every NaN last (ties keep their order) */
static inline uint32_t sort_key(float x) {
    if (isnan(x))
        return 0xFFFFFFFFu;
    float z = x + 0.0f;
    uint32_t b;
    memcpy(&b, &z, 4);
    return b >= 0x80000000u ? ~b : (b | 0x80000000u);
}

/* a stable argsort of n keys (the permutation guard._stable_argsort gives: a stable sort's is unique), as
 * three counting passes over 11-bit digits, least significant first, whose counts stay in the L1 cache; each
 * pass moves the keys with their indices, so that it reads both in order. key is overwritten; tkey: n scratch
 * keys; tmp and out: n indices each */
#define DIGIT_BITS 11
#define DIGITS 3
static void stable_argsort(uint32_t *key, uint32_t *tkey, Py_ssize_t n, Py_ssize_t *tmp, Py_ssize_t *out) {
    Py_ssize_t counts[DIGITS][1 << DIGIT_BITS];
    const uint32_t mask = (1u << DIGIT_BITS) - 1;
    memset(counts, 0, sizeof counts);
    for (Py_ssize_t i = 0; i < n; i++)
        for (int d = 0; d < DIGITS; d++)
            counts[d][(key[i] >> (DIGIT_BITS * d)) & mask]++;
    for (int d = 0; d < DIGITS; d++) {
        Py_ssize_t at = 0;
        for (Py_ssize_t v = 0; v < (1 << DIGIT_BITS); v++) {
            const Py_ssize_t c = counts[d][v];
            counts[d][v] = at;
            at += c;
        }
    }
    /* pass 0 reads (key, i) and writes (tkey, tmp), pass 1 writes (key, out), pass 2 (tkey, tmp) */
    uint32_t *ks = key, *kd = tkey;
    Py_ssize_t *is = NULL, *id = tmp;
    for (int d = 0; d < DIGITS; d++) {
        const int shift = DIGIT_BITS * d;
        Py_ssize_t *c = counts[d];
        for (Py_ssize_t i = 0; i < n; i++) {
            const uint32_t k = ks[i];
            const Py_ssize_t at = c[(k >> shift) & mask]++;
            kd[at] = k;
            id[at] = is ? is[i] : i;
        }
        uint32_t *kt = ks;
        ks = kd;
        kd = kt;
        is = id;
        id = id == tmp ? out : tmp;
    }
    if (is != out)
        memcpy(out, is, (size_t)n * sizeof(Py_ssize_t));
}

static int cmp_float(const void *x, const void *y) {
    const float a = *(const float *)x, b = *(const float *)y;
    return (a > b) - (a < b);
}

/* the k-th smallest of a[0..n) (no NaN), a reordered: Hoare's selection with a median-of-three pivot, and past
 * 2 log2(n) + 8 rounds (an input built against the pivot rule) a sort of what is left, as introselect does */
static float select_kth(float *a, Py_ssize_t n, Py_ssize_t k) {
    Py_ssize_t lo = 0, hi = n - 1;
    int rounds = 8;
    for (Py_ssize_t m = n; m > 1; m >>= 1)
        rounds += 2;
    while (lo < hi) {
        if (rounds-- <= 0) {
            qsort(a + lo, (size_t)(hi - lo + 1), sizeof(float), cmp_float);
            break;
        }
        float p0 = a[lo], p1 = a[lo + (hi - lo) / 2], p2 = a[hi];
        const float pivot = p0 < p1 ? (p1 < p2 ? p1 : (p0 < p2 ? p2 : p0)) : (p0 < p2 ? p0 : (p1 < p2 ? p2 : p1));
        Py_ssize_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot)
                i++;
            while (a[j] > pivot)
                j--;
            if (i <= j) {
                const float t = a[i];
                a[i] = a[j];
                a[j] = t;
                i++;
                j--;
            }
        }
        if (k <= j)
            hi = j;
        else if (k >= i)
            lo = i;
        else
            break;
    }
    return a[k];
}

/* robust.median (np.median's numbers) of a[0..n), n >= 1, a reordered: NaN if one is there; the middle value,
 * or the mean of the middle two as (x + 0 + y) / 2 in float32 */
static float median_of(float *a, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (isnan(a[i]))
            return NAN;
    const Py_ssize_t half = n / 2;
    const float upper = select_kth(a, n, half);
    if (n % 2)
        return upper + 0.0f;
    float lower = a[0];  /* the largest of a[0..half): the selection left the smaller ones there */
    for (Py_ssize_t i = 1; i < half; i++)
        lower = a[i] > lower ? a[i] : lower;
    float t = lower + 0.0f;
    t = t + upper;
    return t / 2.0f;
}

/* robust.median(a, ordered=True) of a sorted run (NaNs last) */
static float median_sorted(const float *a, Py_ssize_t n) {
    if (isnan(a[n - 1]))
        return NAN;
    const Py_ssize_t half = n / 2;
    if (n % 2)
        return a[half] + 0.0f;
    float t = a[half - 1] + 0.0f;
    t = t + a[half];
    return t / 2.0f;
}

PyDoc_STRVAR(noise_fit_doc,
"noise_fit(frame, h, w, stride, blocks_excluded, bins, min_samples)\n\n"
"engine.guard.measure_noise's samples from frame (h, w) float32 (3x3 blocks, every stride-th block row;\n"
"blocks_excluded: (h // 3, w // 3) uint8 0/1, or b'' for none), then, with at least min_samples of them,\n"
"fit_noise's level bins (at most bins, each of 64 samples or more): returns (n, offset, rows), rows a list of\n"
"(level median, MAD, samples) per bin kept: the smoother half's median level, the median absolute deviation\n"
"of its differences (float32 values, as doubles) and its size. Fewer samples than min_samples: rows is None\n"
"and offset NaN (the caller's NumPy takes those). The same numbers as the NumPy code (tests/engine/test_guard.py).");

static PyObject *noise_fit(PyObject *self, PyObject *args) {
    Py_buffer frame, ex;
    Py_ssize_t h, w, stride, bins, min_samples;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnny*nn", &frame, &h, &w, &stride, &ex, &bins, &min_samples))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t by = h >= 0 ? h / 3 : 0, bx = w >= 0 ? w / 3 : 0;
    if (h < 9 || w < 3 || stride < 1 || bins < 1 || h > PY_SSIZE_T_MAX / 4 / (w > 0 ? w : 1)) {
        PyErr_SetString(PyExc_ValueError, "noise_fit: h >= 9, w >= 3, stride >= 1 and bins >= 1 expected");
    } else if (check(&frame, h * w * 4, "frame") && (ex.len == 0 || check(&ex, by * bx, "blocks_excluded"))) {
        if (stride > by)  /* one block row either way; and no overflow stepping past it */
            stride = by;
        const Py_ssize_t most = ((by - 2 + stride - 1) / stride) * bx;
        float *buf = PyMem_RawMalloc((size_t)most * 6 * sizeof(float) + 16);
        Py_ssize_t *idx = PyMem_RawMalloc((size_t)(2 * most) * sizeof(Py_ssize_t) + 16);
        uint32_t *key = PyMem_RawMalloc((size_t)most * 2 * sizeof(uint32_t) + 16);
        Py_ssize_t kept = 0, n = 0;
        float offset = NAN;
        Py_ssize_t bin_n[64];
        float bin_x[64], bin_mad[64];
        if (!buf || !idx || !key) {
            PyErr_NoMemory();
        } else {
            Py_BEGIN_ALLOW_THREADS
            float *level = buf, *diff = buf + most, *st = buf + 2 * most;
            float *sl = buf + 3 * most, *sd = buf + 4 * most, *ss = buf + 5 * most;
            n = samples((const float *)frame.buf, w, by, bx, stride, ex.len ? (const uint8_t *)ex.buf : NULL, level,
                        diff, st);
            if (n >= min_samples && n > 0) {
                Py_ssize_t nb = n / 64;
                nb = nb < bins ? nb : bins;
                nb = nb < 1 ? 1 : nb;
                nb = nb > 64 ? 64 : nb;
                for (Py_ssize_t i = 0; i < n; i++)
                    key[i] = sort_key(level[i]);
                Py_ssize_t *order = idx + most, *tmp = idx;
                stable_argsort(key, key + most, n, tmp, order);
                for (Py_ssize_t i = 0; i < n; i++) {
                    sl[i] = level[order[i]];
                    sd[i] = diff[order[i]];
                    ss[i] = st[order[i]];
                }
                offset = sl[(Py_ssize_t)(0.001 * (double)(n - 1))];
                /* np.array_split: the first n % nb bins one longer */
                const Py_ssize_t each = n / nb, extra = n % nb;
                Py_ssize_t start = 0;
                float *work = level, *dw = diff;  /* free now: scratch for the selections */
                for (Py_ssize_t b = 0; b < nb; b++) {
                    const Py_ssize_t len = each + (b < extra);
                    const float *lv = sl + start, *d = sd + start, *s = ss + start;
                    start += len;
                    memcpy(work, s, (size_t)len * sizeof(float));
                    const float med = median_of(work, len);
                    Py_ssize_t m = 0;
                    for (Py_ssize_t i = 0; i < len; i++)
                        if (s[i] <= med) {
                            work[m] = lv[i];  /* the smooth ones' levels, still in order */
                            dw[m] = d[i];
                            m++;
                        }
                    if (m < 16)
                        continue;
                    const float x = median_sorted(work, m);
                    memcpy(work, dw, (size_t)m * sizeof(float));
                    const float dmed = median_of(work, m);
                    for (Py_ssize_t i = 0; i < m; i++) {
                        const float t = dw[i] - dmed;
                        work[i] = fabsf(t);
                    }
                    bin_x[kept] = x;
                    bin_mad[kept] = median_of(work, m);
                    bin_n[kept] = m;
                    kept++;
                }
            }
            Py_END_ALLOW_THREADS
            if (n >= min_samples && n > 0) {
                PyObject *rows = PyList_New(kept);
                for (Py_ssize_t b = 0; rows && b < kept; b++) {
                    PyObject *row = Py_BuildValue("ddn", (double)bin_x[b], (double)bin_mad[b], bin_n[b]);
                    if (!row) {
                        Py_CLEAR(rows);
                        break;
                    }
                    PyList_SET_ITEM(rows, b, row);
                }
                if (rows)
                    result = Py_BuildValue("ndN", n, (double)offset, rows);
            } else {
                result = Py_BuildValue("ndO", n, (double)offset, Py_None);
            }
        }
        PyMem_RawFree(buf);
        PyMem_RawFree(idx);
        PyMem_RawFree(key);
    }
    PyBuffer_Release(&frame);
    PyBuffer_Release(&ex);
    return result;
}

static PyMethodDef methods[] = {
    {"impulse_pass", impulse_pass, METH_VARARGS, impulse_pass_doc},
    {"finish", finish, METH_VARARGS, finish_doc},
    {"noise_fit", noise_fit, METH_VARARGS, noise_fit_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_impulse", "The guard's whole-frame impulse pass, compiled (engine/_impulse.c).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__impulse(void) { return PyModule_Create(&module); }
