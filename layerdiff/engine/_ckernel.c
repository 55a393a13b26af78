/* layerdiff.engine._ckernel: decode fused with the sums, in one memory pass.
 *
 * Why C: the numpy kernel spends its time converting to float temporaries
 * (2-5 GB/s per core); a loop that decodes in registers and keeps the sums
 * there runs at about the speed of reading the bytes.
 *
 * Inputs are raw 2-D views of tensor bytes (rows of `cols` contiguous values,
 * any row stride) exported through the buffer protocol, with the safetensors
 * dtype code next to them; nothing here depends on numpy at build time.
 *
 * Accuracy. A product of two bf16/f16/f8 values is exact in float32, so the
 * only error is the float32 summation, and it is not only random: the low
 * bits of squares are not uniform (odd squares are 1 mod 8), so a square
 * added to a much larger float32 sum is rounded down more often than up, a
 * bias of ~1e-7 relative with 64 terms per sum, which moves cosines by ~5e-8.
 * So each float32 lane holds at most FLUSH (4) products before it is added
 * into float64 lanes (cosine error <= ~4e-9 on heavy-tailed data, ~1.5e-9 on
 * normal data, against float64 over the decoded values).
 * F16 products have up to 22 significant bits, too many for even 4-term
 * float32 sums, so F16, F32 and F64 (and two different dtypes) are summed in
 * float64 lanes (f32 x f32 products are exact in double). diff_sums works in
 * float64 for every dtype (it needs the differences in double anyway): its
 * sums are as good as float64 over the decoded values.
 * Differences are taken in double: max |b-a| and the equality count are exact.
 *
 * Non-finite values propagate into the sums as in float64; a square beyond
 * float32 (|x| > 1.8e19, only bf16 holds such values) overflows to inf. max
 * |b-a| is NaN when a difference is NaN (then |b-a|^2 is NaN too). Equality
 * is IEEE: NaN != NaN, -0 == +0.
 *
 * Speed: the loops use GCC/clang generic vectors of 32 bytes (8 float32 or 4
 * float64 lanes), lowered to what each variant's instruction set has. Every
 * loop is compiled once per variant (AVX2+FMA, AVX-512, the baseline) and a
 * table is chosen at import with __builtin_cpu_supports; never -march=native.
 * Other architectures get the baseline build (NEON is baseline on aarch64).
 * F16 is decoded with F16C's vcvtph2ps in the x86 variants (f16c_load16),
 * with bit formulas elsewhere (vdec_f16): the same floats.
 * All variants give the same sums, bit for bit, for every dtype but F64 (same
 * lanes, same order; the products are exact, so FMA changes nothing). The GIL is released inside the loops.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#if !(defined(__GNUC__) || defined(__clang__))
#error "the compiled kernel needs GCC or clang (generic vectors); layerdiff falls back to its numpy kernel"
#endif
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the compiled kernel assumes little-endian data (safetensors is little-endian)"
#endif
#if defined(__GNUC__) && !defined(__clang__)
/* The vector helpers are always inlined: no vector crosses a call. */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define INLINE static inline __attribute__((always_inline))
#define NOINLINE __attribute__((noinline))
#define ALIGNED(n) __attribute__((aligned(n)))

#if defined(__x86_64__)
#define LD_X86_VARIANTS 1
#endif

enum { C_BF16, C_F16, C_E4M3, C_E5M2, C_F32, C_F64, N_CODES };
static const char *const CODE_NAMES[N_CODES] = {"BF16", "F16", "F8_E4M3", "F8_E5M2", "F32", "F64"};
static const Py_ssize_t CODE_SIZE[N_CODES] = {2, 2, 1, 1, 4, 8};

#define STEP 16 /* narrow values per step: 8 at even, 8 at odd positions */
#define FLUSH 4 /* steps per float32 run: <= 4 products per float32 lane */
#define WSTEP 8 /* wide values per step: two vectors of 4 doubles */
#define MIXED_RUN 1024
/* Rows are summed in pieces: the float32 pairs and int32 equality counts of a
 * piece stay far from overflow (<= 2^24 values). */
#define ROW_PIECE ((Py_ssize_t)1 << 24)

typedef struct {
    const char *p;
    Py_ssize_t rows, cols, stride; /* stride: bytes from one row to the next */
    int code;
} Mat;

typedef struct {
    double aa, bb, ab, dd, maxabs;
    int64_t equal;
} Sums;

/* OP_NEXT: a pair whose <a,a> the caller has already (a chain of layers): <b,b>, <a,b>. */
enum { OP_NORM, OP_PAIR, OP_DIFF, OP_NEXT, N_OPS };
#define PAIRED(op) ((op) == OP_PAIR || (op) == OP_NEXT)
#define NEED_AA(op) ((op) != OP_NEXT)

/* 4 or 8 bytes a value: read as doubles (the 16- and 8-bit codes are decoded
 * 16 at a time, in even and odd lanes). */
INLINE int wide(int code) { return code >= C_F32; }

/* Which narrow sums go to float64 lanes at once: F16, whose products have up
 * to 22 significant bits, so that even 4-term float32 sums of them round
 * (cosines off by 1e-8; bf16 and fp8 products have 16 bits or fewer), and
 * every diff (it needs the differences in double anyway). */
#define IN_DOUBLE(op, code) ((op) == OP_DIFF || (code) == C_F16)

/* A view whose rows follow each other without gaps is one long row. */
INLINE void collapse(Mat *a, Mat *b) {
    if (a->rows > 1 && a->stride == a->cols * CODE_SIZE[a->code] && b->stride == b->cols * CODE_SIZE[b->code]) {
        a->cols *= a->rows;
        a->rows = 1;
        b->cols *= b->rows;
        b->rows = 1;
    }
}

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef double vd __attribute__((vector_size(32)));
typedef int64_t vl __attribute__((vector_size(32)));
typedef uint16_t vh __attribute__((vector_size(16)));
typedef double v8d __attribute__((vector_size(64))); /* 8 float32 lanes, widened */

/* ---- decoding (exact; any alignment) ------------------------------------ */

INLINE vu vsel(vu mask, vu a, vu b) { return (a & mask) | (b & ~mask); }

/* f16 bits (low 16 bits of each lane) -> f32: rebias normal exponents, build
 * subnormals from the integer mantissa, keep inf/NaN payloads (as numpy). */
INLINE vf vdec_f16(vu h) {
    vu em = h & 0x7fffu;
    vu sign = (h & 0x8000u) << 16;
    vu normal = (em << 13) + (112u << 23);
    vu special = (em << 13) | 0x7f800000u;
    vu sub = (vu)(__builtin_convertvector((vi)em, vf) * 0x1p-24f);
    /* em < 2^15: signed compares (x86 has no unsigned 32-bit vector compare) */
    vu r = vsel((vu)((vi)em < 0x400), sub, vsel((vu)((vi)em > 0x7bff), special, normal));
    return (vf)(r | sign);
}

/* F8_E4M3 is the "fn" variant: bias 7, no infinities, S.1111.111 is NaN. */
INLINE vf vdec_e4m3(vu v) {
    vu em = v & 0x7fu;
    vu sign = (v & 0x80u) << 24;
    vu normal = (em << 20) + (120u << 23);
    vu sub = (vu)(__builtin_convertvector((vi)em, vf) * 0x1p-9f);
    vu nan = (vu){0} + 0x7fc00000u;
    vu r = vsel((vu)((vi)em < 8), sub, vsel((vu)(em == 0x7fu), nan, normal));
    return (vf)(r | sign);
}

/* F8_E5M2 is the top byte of an f16. */
INLINE vf vdec_e5m2(vu v) { return vdec_f16(v << 8); }

/* float32 -> float64, exact. Converting all 8 lanes and then taking halves is
 * what GCC lowers well (vcvtps2pd twice on AVX2); halves first went through
 * 2-lane conversions, and 8-lane double accumulators through memory. */
INLINE vd lo4(vf v) {
    v8d d = __builtin_convertvector(v, v8d);
    return __builtin_shufflevector(d, d, 0, 1, 2, 3);
}
INLINE vd hi4(vf v) {
    v8d d = __builtin_convertvector(v, v8d);
    return __builtin_shufflevector(d, d, 4, 5, 6, 7);
}
#ifdef LD_X86_VARIANTS
#include <immintrin.h>
/* F16 with the F16C instruction (vcvtph2ps), 3x fewer instructions than
 * vdec_f16. Not always_inline: the baseline variant, which lacks F16C, may
 * not inline it (it never calls it, see hw16); the AVX2 / AVX-512 ones do. */
__attribute__((target("avx,f16c"))) static inline void f16c_load16(const char *p, vf *e, vf *o) {
    __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)));
    memcpy(e, &lo, sizeof *e);
    memcpy(o, &hi, sizeof *o);
}
#endif

/* 16 narrow values at p: e gets those at even positions, o the odd ones
 * (F16: the first 8 and the next 8, so that F16C converts them in place).
 * hw16: this variant has F16C (every variant gives the same floats). */
INLINE void load16(int code, int hw16, const char *p, vf *e, vf *o) {
    vu w;
    vh h;
    switch (code) {
    case C_BF16: /* a 32-bit word holds two bf16: shift one up, mask the other */
        memcpy(&w, p, sizeof w);
        *e = (vf)(w << 16);
        *o = (vf)(w & 0xffff0000u);
        return;
    case C_F16:
#ifdef LD_X86_VARIANTS
        if (hw16) {
            f16c_load16(p, e, o);
            return;
        }
#endif
        (void)hw16;
        memcpy(&h, p, sizeof h);
        *e = vdec_f16(__builtin_convertvector(h, vu));
        memcpy(&h, p + sizeof h, sizeof h);
        *o = vdec_f16(__builtin_convertvector(h, vu));
        return;
    default: /* fp8: a 16-bit word holds two */
        memcpy(&h, p, sizeof h);
        w = __builtin_convertvector(h, vu);
        *e = code == C_E4M3 ? vdec_e4m3(w & 0xffu) : vdec_e5m2(w & 0xffu);
        *o = code == C_E4M3 ? vdec_e4m3(w >> 8) : vdec_e5m2(w >> 8);
        return;
    }
}

/* 8 values of F32 or F64 at p as two vectors of 4 doubles (exact). */
INLINE void load8(int code, const char *p, vd *lo, vd *hi) {
    if (code == C_F32) {
        vf f;
        memcpy(&f, p, sizeof f);
        *lo = lo4(f);
        *hi = hi4(f);
    } else {
        memcpy(lo, p, sizeof *lo);
        memcpy(hi, p + sizeof *lo, sizeof *hi);
    }
}

INLINE vd vabs(vd v) { return (vd)((vl)v & 0x7fffffffffffffffLL); }
/* max ignoring NaN (a NaN difference shows in |b-a|^2, see diff_result) */
INLINE vd vmax(vd m, vd v) {
    vl gt = (vl)(v > m);
    return (vd)(((vl)v & gt) | ((vl)m & ~gt));
}

INLINE double hsum(vd v) { return (v[0] + v[1]) + (v[2] + v[3]); }
INLINE double hmax(vd v) {
    double m = v[0];
    for (int k = 1; k < 4; k++) m = v[k] > m ? v[k] : m;
    return m;
}

/* ---- narrow x narrow (bf16, fp8), one dtype: float32 runs -------------- */

/* The float64 lanes of a whole call. */
typedef struct {
    vd aa[2], bb[2], ab[2], dd[2], mx[2];
    int64_t equal;
} Acc;

/* One step of 16 values from pa/pb into the float32 lanes; a diff takes the
 * differences in double anyway, and sums everything there. */
#define NARROW_STEP_(PA, PB, FIRST)                                             \
    do {                                                                        \
        vf xe, xo, ye = {0}, yo = {0};                                          \
        load16(code, hw16, PA, &xe, &xo);                                       \
        if (op != OP_NORM) load16(code, hw16, PB, &ye, &yo);                    \
        if (IN_DOUBLE(op, code)) {                                              \
            vd x0 = lo4(xe), x1 = hi4(xe), x2 = lo4(xo), x3 = hi4(xo);          \
            if (NEED_AA(op)) {                                                  \
                acc.aa[0] += x0 * x0 + x2 * x2;                                 \
                acc.aa[1] += x1 * x1 + x3 * x3;                                 \
            }                                                                   \
            if (op != OP_NORM) {                                                \
                vd y0 = lo4(ye), y1 = hi4(ye), y2 = lo4(yo), y3 = hi4(yo);      \
                acc.bb[0] += y0 * y0 + y2 * y2;                                 \
                acc.bb[1] += y1 * y1 + y3 * y3;                                 \
                acc.ab[0] += x0 * y0 + x2 * y2;                                 \
                acc.ab[1] += x1 * y1 + x3 * y3;                                 \
                if (op == OP_DIFF) {                                            \
                    vd d0 = y0 - x0, d1 = y1 - x1, d2 = y2 - x2, d3 = y3 - x3;  \
                    acc.dd[0] += d0 * d0 + d2 * d2;                             \
                    acc.dd[1] += d1 * d1 + d3 * d3;                             \
                    acc.mx[0] = vmax(vmax(acc.mx[0], vabs(d0)), vabs(d2));      \
                    acc.mx[1] = vmax(vmax(acc.mx[1], vabs(d1)), vabs(d3));      \
                    eq -= (vi)(xe == ye);                                       \
                    eq -= (vi)(xo == yo);                                       \
                }                                                               \
            }                                                                   \
        } else if (FIRST) { /* a run's first products: no add to zero */      \
            if (NEED_AA(op)) {                                                  \
                fa_e = xe * xe;                                                 \
                fa_o = xo * xo;                                                 \
            }                                                                   \
            if (PAIRED(op)) {                                                   \
                fb_e = ye * ye;                                                 \
                fb_o = yo * yo;                                                 \
                fab_e = xe * ye;                                                \
                fab_o = xo * yo;                                                \
            }                                                                   \
        } else {                                                                \
            if (NEED_AA(op)) {                                                  \
                fa_e += xe * xe;                                                \
                fa_o += xo * xo;                                                \
            }                                                                   \
            if (PAIRED(op)) {                                                   \
                fb_e += ye * ye;                                                \
                fb_o += yo * yo;                                                \
                fab_e += xe * ye;                                               \
                fab_o += xo * yo;                                               \
            }                                                                   \
        }                                                                       \
    } while (0)
#define NARROW_STEP(PA, PB) NARROW_STEP_(PA, PB, 0)

/* The float32 run lanes (<= FLUSH products each) into float64 lanes: an
 * exact conversion, then one double add per lane. */
#define NARROW_FLUSH()                                                          \
    do {                                                                        \
        if (NEED_AA(op) && !IN_DOUBLE(op, code)) {                              \
            da0 += lo4(fa_e) + lo4(fa_o);                                       \
            da1 += hi4(fa_e) + hi4(fa_o);                                       \
        }                                                                       \
        if (PAIRED(op) && !IN_DOUBLE(op, code)) {                               \
            db0 += lo4(fb_e) + lo4(fb_o);                                       \
            db1 += hi4(fb_e) + hi4(fb_o);                                       \
            dab0 += lo4(fab_e) + lo4(fab_o);                                    \
            dab1 += hi4(fab_e) + hi4(fab_o);                                    \
        }                                                                       \
    } while (0)

#define NARROW_ZERO() vf fa_e = {0}, fa_o = {0}, fb_e = {0}, fb_o = {0}, fab_e = {0}, fab_o = {0}

/* n <= ROW_PIECE values of one row. */
INLINE void narrow_row(int op, int code, int hw16, const char *pa, const char *pb, Py_ssize_t n, Acc *accp) {
    Acc acc = *accp;
    vd da0 = {0}, da1 = {0}, db0 = {0}, db1 = {0}, dab0 = {0}, dab1 = {0};
    vi eq = {0};
    const Py_ssize_t z = CODE_SIZE[code], zs = z * STEP;
    Py_ssize_t j = 0;
    for (; j + STEP * FLUSH <= n; j += STEP * FLUSH) {
        NARROW_ZERO();
        const char *qa = pa + j * z, *qb = pb + j * z;
        NARROW_STEP_(qa, qb, 1);
        for (int t = 1; t < FLUSH; t++) NARROW_STEP(qa + t * zs, qb + t * zs);
        NARROW_FLUSH();
    }
    if (j < n) { /* < 64 values left: whole steps, then one zero-padded step */
        NARROW_ZERO();
        for (; j + STEP <= n; j += STEP) NARROW_STEP(pa + j * z, pb + j * z);
        if (j < n) {
            ALIGNED(32) char ta[32] = {0}, tb[32] = {0};
            memcpy(ta, pa + j * z, (size_t)((n - j) * z));
            if (op != OP_NORM) memcpy(tb, pb + j * z, (size_t)((n - j) * z));
            NARROW_STEP(ta, tb);
            if (op == OP_DIFF) acc.equal -= STEP - (n - j); /* the padding's zeros are equal */
        }
        NARROW_FLUSH();
    }
    if (NEED_AA(op) && !IN_DOUBLE(op, code)) {
        acc.aa[0] += da0;
        acc.aa[1] += da1;
    }
    if (PAIRED(op) && !IN_DOUBLE(op, code)) {
        acc.bb[0] += db0;
        acc.bb[1] += db1;
        acc.ab[0] += dab0;
        acc.ab[1] += dab1;
    }
    if (op == OP_DIFF)
        for (int k = 0; k < 8; k++) acc.equal += eq[k];
    *accp = acc;
}

/* ---- wide (F32, F64) or mixed dtypes: float64 lanes ---------------------- */

#define WIDE_STEP(PA, PB)                                                       \
    do {                                                                        \
        vd x0, x1, y0 = {0}, y1 = {0};                                          \
        load8(ca, PA, &x0, &x1);                                                \
        if (NEED_AA(op)) {                                                      \
            acc.aa[0] += x0 * x0;                                               \
            acc.aa[1] += x1 * x1;                                               \
        }                                                                       \
        if (op != OP_NORM) {                                                    \
            load8(cb, PB, &y0, &y1);                                            \
            acc.bb[0] += y0 * y0;                                               \
            acc.bb[1] += y1 * y1;                                               \
            acc.ab[0] += x0 * y0;                                               \
            acc.ab[1] += x1 * y1;                                               \
        }                                                                       \
        if (op == OP_DIFF) {                                                    \
            vd d0 = y0 - x0, d1 = y1 - x1;                                      \
            acc.dd[0] += d0 * d0;                                               \
            acc.dd[1] += d1 * d1;                                               \
            acc.mx[0] = vmax(acc.mx[0], vabs(d0));                              \
            acc.mx[1] = vmax(acc.mx[1], vabs(d1));                              \
            eq -= (vl)(x0 == y0);                                               \
            eq -= (vl)(x1 == y1);                                               \
        }                                                                       \
    } while (0)

INLINE void wide_row(int op, int ca, int cb, const char *pa, const char *pb, Py_ssize_t n, Acc *accp) {
    Acc acc = *accp;
    vl eq = {0};
    const Py_ssize_t za = CODE_SIZE[ca], zb = CODE_SIZE[cb];
    Py_ssize_t j = 0;
    for (; j + WSTEP <= n; j += WSTEP) WIDE_STEP(pa + j * za, pb + j * zb);
    if (j < n) {
        ALIGNED(32) char ta[64] = {0}, tb[64] = {0};
        memcpy(ta, pa + j * za, (size_t)((n - j) * za));
        if (op != OP_NORM) memcpy(tb, pb + j * zb, (size_t)((n - j) * zb));
        WIDE_STEP(ta, tb);
        if (op == OP_DIFF) acc.equal -= WSTEP - (n - j);
    }
    if (op == OP_DIFF) acc.equal += eq[0] + eq[1] + eq[2] + eq[3];
    *accp = acc;
}

/* Element-wise decoders for plain loops (decode, mixed dtypes): the same
 * formulas on scalars, written with masks so that the loops vectorise. */
INLINE float s_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
INLINE uint32_t s_fbits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
INLINE uint32_t s_mask(int c) { return 0u - (uint32_t)c; }

INLINE float s_f16(uint32_t h) {
    uint32_t em = h & 0x7fffu, sign = (h & 0x8000u) << 16;
    uint32_t normal = (em << 13) + (112u << 23), special = (em << 13) | 0x7f800000u;
    uint32_t sub = s_fbits((float)(int32_t)em * 0x1p-24f);
    uint32_t ms = s_mask((int32_t)em < 0x400), mi = s_mask((int32_t)em > 0x7bff);
    return s_bits((sub & ms) | (special & mi) | (normal & ~(ms | mi)) | sign);
}

INLINE float s_e4m3(uint32_t v) {
    uint32_t em = v & 0x7fu, sign = (v & 0x80u) << 24;
    uint32_t normal = (em << 20) + (120u << 23);
    uint32_t sub = s_fbits((float)(int32_t)em * 0x1p-9f);
    uint32_t ms = s_mask((int32_t)em < 8), mn = s_mask(em == 0x7fu);
    return s_bits((sub & ms) | (0x7fc00000u & mn) | (normal & ~(ms | mn)) | sign);
}

/* Element i of a narrow code as float (exact). */
INLINE float ld_float(int code, const char *p, Py_ssize_t i) {
    uint16_t h;
    switch (code) {
    case C_BF16:
        memcpy(&h, p + 2 * i, 2);
        return s_bits((uint32_t)h << 16);
    case C_F16:
        memcpy(&h, p + 2 * i, 2);
        return s_f16(h);
    case C_E4M3:
        return s_e4m3((uint8_t)p[i]);
    default:
        return s_f16((uint32_t)(uint8_t)p[i] << 8);
    }
}

/* Element i of any code as double (exact). */
INLINE double ld_double(int code, const char *p, Py_ssize_t i) {
    float f;
    double d;
    switch (code) {
    case C_F32:
        memcpy(&f, p + 4 * i, 4);
        return f;
    case C_F64:
        memcpy(&d, p + 8 * i, 8);
        return d;
    default:
        return ld_float(code, p, i);
    }
}

/* ---- rows -> sums ---------------------------------------------------------- */

INLINE void acc_out(int op, const Acc *acc, Sums *s) {
    s->aa += hsum(acc->aa[0] + acc->aa[1]);
    if (op != OP_NORM) {
        s->bb += hsum(acc->bb[0] + acc->bb[1]);
        s->ab += hsum(acc->ab[0] + acc->ab[1]);
    }
    if (op == OP_DIFF) {
        s->dd += hsum(acc->dd[0] + acc->dd[1]);
        double m = hmax(vmax(acc->mx[0], acc->mx[1]));
        s->maxabs = m > s->maxabs ? m : s->maxabs;
        s->equal += acc->equal;
    }
}

/* Same dtype on both sides (the scans): one loop per code, decode inlined. */
INLINE void sum_rows(int op, int code, int hw16, const Mat *a, const Mat *b, Sums *s) {
    Acc acc;
    memset(&acc, 0, sizeof acc);
    const Py_ssize_t z = CODE_SIZE[code];
    for (Py_ssize_t r = 0; r < a->rows; r++) {
        const char *pa = a->p + r * a->stride, *pb = b->p + r * b->stride;
        for (Py_ssize_t off = 0; off < a->cols; off += ROW_PIECE) {
            Py_ssize_t m = a->cols - off < ROW_PIECE ? a->cols - off : ROW_PIECE;
            if (wide(code))
                wide_row(op, code, code, pa + off * z, pb + off * z, m, &acc);
            else
                narrow_row(op, code, hw16, pa + off * z, pb + off * z, m, &acc);
        }
    }
    acc_out(op, &acc, s);
}

/* n values of `code` into doubles: one loop per code. */
INLINE void run_double(int code, const char *p, Py_ssize_t n, double *restrict o) {
    switch (code) {
    case C_BF16: for (Py_ssize_t i = 0; i < n; i++) o[i] = ld_double(C_BF16, p, i); break;
    case C_F16: for (Py_ssize_t i = 0; i < n; i++) o[i] = ld_double(C_F16, p, i); break;
    case C_E4M3: for (Py_ssize_t i = 0; i < n; i++) o[i] = ld_double(C_E4M3, p, i); break;
    case C_E5M2: for (Py_ssize_t i = 0; i < n; i++) o[i] = ld_double(C_E5M2, p, i); break;
    case C_F32: for (Py_ssize_t i = 0; i < n; i++) o[i] = ld_double(C_F32, p, i); break;
    default: memcpy(o, p, (size_t)n * 8); break;
    }
}

/* Different dtypes (a diff of bf16 against f32, say): both decoded to double
 * a run at a time, then summed as F64 x F64 (products exact or float64). */
INLINE void sum_rows_mixed(int op, const Mat *a, const Mat *b, Sums *s) {
    ALIGNED(32) double x[MIXED_RUN], y[MIXED_RUN];
    Acc acc;
    memset(&acc, 0, sizeof acc);
    for (Py_ssize_t r = 0; r < a->rows; r++) {
        const char *pa = a->p + r * a->stride, *pb = b->p + r * b->stride;
        for (Py_ssize_t off = 0; off < a->cols; off += MIXED_RUN) {
            Py_ssize_t m = a->cols - off < MIXED_RUN ? a->cols - off : MIXED_RUN;
            run_double(a->code, pa + off * CODE_SIZE[a->code], m, x);
            run_double(b->code, pb + off * CODE_SIZE[b->code], m, y);
            wide_row(op, C_F64, C_F64, (const char *)x, (const char *)y, m, &acc);
        }
    }
    acc_out(op, &acc, s);
}

/* ---- decode into float32 / float64 ------------------------------------------ */

/* out rows are aligned to their item size (checked by the caller). */
INLINE void decode_code(int code, int out_size, const Mat *a, char *out, Py_ssize_t out_stride) {
    for (Py_ssize_t r = 0; r < a->rows; r++) {
        const char *pa = a->p + r * a->stride;
        char *po = out + r * out_stride;
        const Py_ssize_t n = a->cols;
        if (code == C_F32 && out_size == 4) {
            memcpy(po, pa, (size_t)n * 4);
        } else if (code == C_F64 && out_size == 8) {
            memcpy(po, pa, (size_t)n * 8);
        } else if (out_size == 4) {
            float *o = (float *)po;
            if (code == C_F64) /* rounds to nearest, like numpy's astype */
                for (Py_ssize_t i = 0; i < n; i++) o[i] = (float)ld_double(C_F64, pa, i);
            else
                for (Py_ssize_t i = 0; i < n; i++) o[i] = ld_float(code, pa, i);
        } else {
            double *o = (double *)po;
            for (Py_ssize_t i = 0; i < n; i++) o[i] = ld_double(code, pa, i);
        }
    }
}

/* ---- one function table per instruction-set variant -------------------------
 * Each (operation, dtype) loop is its own function, compiled once per
 * variant: separate functions keep each loop's registers to itself (one huge
 * function made GCC spill the accumulators). */

typedef void (*RowsFn)(const Mat *a, const Mat *b, Sums *s);
typedef void (*DecodeFn)(const Mat *a, char *out, Py_ssize_t out_stride);

typedef struct {
    const char *name;
    RowsFn same[N_OPS][N_CODES]; /* [op][code]: both inputs of one dtype */
    RowsFn mixed[N_OPS];         /* [op]: different dtypes (OP_NEXT: as OP_PAIR) */
    DecodeFn decode[2][N_CODES]; /* [float32, float64 out][code] */
} Variant;

#define ROWS_FN(V, ATTR, OP, CODE)                                                           \
    ATTR NOINLINE static void V##_##OP##_##CODE(const Mat *a, const Mat *b, Sums *s) {        \
        sum_rows(OP, CODE, HW16_##V, a, b, s);                                               \
    }
#define MIXED_FN(V, ATTR, OP)                                                                \
    ATTR NOINLINE static void V##_##OP##_mixed(const Mat *a, const Mat *b, Sums *s) {         \
        sum_rows_mixed(OP, a, b, s);                                                         \
    }
#define DECODE_FN(V, ATTR, Z, CODE)                                                          \
    ATTR NOINLINE static void V##_dec##Z##_##CODE(const Mat *a, char *o, Py_ssize_t os) {     \
        decode_code(CODE, Z, a, o, os);                                                      \
    }
#define ALL_CODES(M, ...) \
    M(__VA_ARGS__, C_BF16) M(__VA_ARGS__, C_F16) M(__VA_ARGS__, C_E4M3) \
    M(__VA_ARGS__, C_E5M2) M(__VA_ARGS__, C_F32) M(__VA_ARGS__, C_F64)

#define DEFINE_VARIANT(V, ATTR)              \
    ALL_CODES(ROWS_FN, V, ATTR, OP_NORM)     \
    ALL_CODES(ROWS_FN, V, ATTR, OP_PAIR)     \
    ALL_CODES(ROWS_FN, V, ATTR, OP_DIFF)     \
    ALL_CODES(ROWS_FN, V, ATTR, OP_NEXT)     \
    MIXED_FN(V, ATTR, OP_PAIR)               \
    MIXED_FN(V, ATTR, OP_DIFF)               \
    ALL_CODES(DECODE_FN, V, ATTR, 4)         \
    ALL_CODES(DECODE_FN, V, ATTR, 8)

#define ROW_OF(V, OP) \
    {V##_##OP##_C_BF16, V##_##OP##_C_F16, V##_##OP##_C_E4M3, V##_##OP##_C_E5M2, V##_##OP##_C_F32, V##_##OP##_C_F64}
#define DEC_OF(V, Z) \
    {V##_dec##Z##_C_BF16, V##_dec##Z##_C_F16, V##_dec##Z##_C_E4M3, V##_dec##Z##_C_E5M2, V##_dec##Z##_C_F32, V##_dec##Z##_C_F64}
#define VARIANT_ENTRY(V)                                                   \
    {#V, {ROW_OF(V, OP_NORM), ROW_OF(V, OP_PAIR), ROW_OF(V, OP_DIFF), ROW_OF(V, OP_NEXT)},    \
     {NULL, V##_OP_PAIR_mixed, V##_OP_DIFF_mixed, V##_OP_PAIR_mixed}, {DEC_OF(V, 4), DEC_OF(V, 8)}}

/* Which variants have F16C. */
#define HW16_default 0
#define HW16_avx2 1
#define HW16_avx512 1
DEFINE_VARIANT(default, )
#ifdef LD_X86_VARIANTS
DEFINE_VARIANT(avx2, __attribute__((target("avx2,fma,f16c"))))
DEFINE_VARIANT(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))))
#endif

/* The first one this CPU runs is used. AVX2 goes before AVX-512: the loops
 * are 256 bits wide, and with AVX-512 enabled GCC widens each float32 ->
 * float64 conversion to a 512-bit one plus shuffles; on AMD EPYC that variant
 * measured 1.2-1.4x slower in pair sums, even in norms, and only in diffs of
 * F32 faster (benchmarks/kernel_speed.py --isas). It stays, selectable with
 * set_isa, and is tested against the others. */
static const Variant VARIANTS[] = {
#ifdef LD_X86_VARIANTS
    VARIANT_ENTRY(avx2),
    VARIANT_ENTRY(avx512),
#endif
    VARIANT_ENTRY(default),
};
#define N_VARIANTS ((int)(sizeof(VARIANTS) / sizeof(VARIANTS[0])))

static void run_variant(const Variant *v, int op, Mat a, Mat b, Sums *s) {
    if (op == OP_NORM) b = a;
    collapse(&a, &b);
    if (a.code == b.code)
        v->same[op][a.code](&a, &b, s);
    else
        v->mixed[op](&a, &b, s);
}

static int supported(const Variant *v) {
#ifdef LD_X86_VARIANTS
    __builtin_cpu_init();
    if (strcmp(v->name, "avx512") == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (strcmp(v->name, "avx2") == 0)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
#endif
    (void)v;
    return 1;
}

static const Variant *current = NULL;

/* ---- Python glue ------------------------------------------------------- */

static int parse_code(PyObject *code) {
    const char *s = PyUnicode_Check(code) ? PyUnicode_AsUTF8(code) : NULL;
    if (s != NULL)
        for (int i = 0; i < N_CODES; i++)
            if (strcmp(s, CODE_NAMES[i]) == 0) return i;
    PyErr_Format(PyExc_ValueError, "unsupported dtype code %R (expected one of BF16, F16, F32, F64, F8_E4M3, F8_E5M2)",
                 code);
    return -1;
}

/* A 1-D or 2-D buffer whose rows are contiguous: a Mat. */
static int get_mat(PyObject *obj, PyObject *code_obj, Py_buffer *view, Mat *m, const char *what) {
    int code = parse_code(code_obj);
    if (code < 0) return -1;
    if (PyObject_GetBuffer(obj, view, PyBUF_STRIDES) < 0) return -1;
    Py_ssize_t z = CODE_SIZE[code];
    if (view->itemsize != z) {
        PyErr_Format(PyExc_ValueError, "%s: items of %zd bytes, but %s values have %zd", what, view->itemsize,
                     CODE_NAMES[code], z);
        goto fail;
    }
    m->p = (const char *)view->buf;
    m->code = code;
    if (view->ndim == 1) {
        m->rows = 1;
        m->cols = view->shape[0];
        m->stride = 0;
        if (m->cols > 1 && view->strides[0] != z) goto strided;
    } else if (view->ndim == 2) {
        m->rows = view->shape[0];
        m->cols = view->shape[1];
        m->stride = view->strides[0];
        if (m->cols > 1 && view->strides[1] != z) goto strided;
    } else {
        PyErr_Format(PyExc_ValueError, "%s: expected a 1-D or 2-D array, got %d dimensions", what, view->ndim);
        goto fail;
    }
    if (m->rows == 0 || m->cols == 0) m->rows = m->cols = 0;
    return 0;
strided:
    PyErr_Format(PyExc_ValueError, "%s: the values of a row must be contiguous", what);
fail:
    PyBuffer_Release(view);
    return -1;
}

static int same_shape(const Mat *a, const Mat *b) {
    if (a->rows == b->rows && a->cols == b->cols) return 0;
    PyErr_Format(PyExc_ValueError, "shapes differ: (%zd, %zd) and (%zd, %zd)", a->rows, a->cols, b->rows, b->cols);
    return -1;
}

static PyObject *run_sums(int op, PyObject *args) {
    PyObject *a, *ac, *b = NULL, *bc = NULL;
    if (op == OP_NORM) {
        if (!PyArg_ParseTuple(args, "OO", &a, &ac)) return NULL;
    } else if (!PyArg_ParseTuple(args, "OOOO", &a, &ac, &b, &bc))
        return NULL;
    Py_buffer va, vb;
    Mat ma, mb;
    if (get_mat(a, ac, &va, &ma, "a") < 0) return NULL;
    if (op == OP_NORM)
        mb = ma;
    else {
        if (get_mat(b, bc, &vb, &mb, "b") < 0) {
            PyBuffer_Release(&va);
            return NULL;
        }
        if (same_shape(&ma, &mb) < 0) {
            PyBuffer_Release(&va);
            PyBuffer_Release(&vb);
            return NULL;
        }
    }
    Sums s = {0, 0, 0, 0, 0, 0};
    const Variant *v = current;
    Py_BEGIN_ALLOW_THREADS run_variant(v, op, ma, mb, &s);
    Py_END_ALLOW_THREADS PyBuffer_Release(&va);
    if (op != OP_NORM) PyBuffer_Release(&vb);
    if (op == OP_NORM) return PyFloat_FromDouble(s.aa);
    if (op == OP_PAIR) return Py_BuildValue("(ddd)", s.aa, s.bb, s.ab);
    if (op == OP_NEXT) return Py_BuildValue("(dd)", s.bb, s.ab);
    /* The sum of squared differences is NaN exactly when a difference is. */
    if (isnan(s.dd)) s.maxabs = NAN;
    return Py_BuildValue("(ddddLd)", s.aa, s.bb, s.ab, s.dd, (long long)s.equal, s.maxabs);
}

static PyObject *py_pair_sums(PyObject *self, PyObject *args) { return run_sums(OP_PAIR, args); }
static PyObject *py_next_sums(PyObject *self, PyObject *args) { return run_sums(OP_NEXT, args); }
static PyObject *py_norm_sum(PyObject *self, PyObject *args) { return run_sums(OP_NORM, args); }
static PyObject *py_diff_sums(PyObject *self, PyObject *args) { return run_sums(OP_DIFF, args); }

static PyObject *py_decode(PyObject *self, PyObject *args) {
    PyObject *a, *ac, *out;
    if (!PyArg_ParseTuple(args, "OOO", &a, &ac, &out)) return NULL;
    Py_buffer va, vo;
    Mat ma;
    if (get_mat(a, ac, &va, &ma, "a") < 0) return NULL;
    if (PyObject_GetBuffer(out, &vo, PyBUF_STRIDES | PyBUF_WRITABLE | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&va);
        return NULL;
    }
    const char *f = vo.format ? vo.format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    int z = (int)vo.itemsize;
    if (!((z == 4 && strcmp(f, "f") == 0) || (z == 8 && strcmp(f, "d") == 0))) {
        PyErr_SetString(PyExc_ValueError, "out must be float32 or float64");
        goto fail;
    }
    if (vo.ndim < 1 || vo.ndim > 2) {
        PyErr_SetString(PyExc_ValueError, "out must be 1-D or 2-D");
        goto fail;
    }
    Py_ssize_t rows = vo.ndim == 2 ? vo.shape[0] : 1, cols = vo.shape[vo.ndim - 1];
    Py_ssize_t ostride = vo.ndim == 2 ? vo.strides[0] : 0;
    if (rows == 0 || cols == 0) rows = cols = 0;
    if (rows != ma.rows || cols != ma.cols) {
        PyErr_Format(PyExc_ValueError, "out has shape (%zd, %zd), a has (%zd, %zd)", rows, cols, ma.rows, ma.cols);
        goto fail;
    }
    if (cols > 1 && vo.strides[vo.ndim - 1] != z) {
        PyErr_SetString(PyExc_ValueError, "out: the values of a row must be contiguous");
        goto fail;
    }
    if ((uintptr_t)vo.buf % (uintptr_t)z || ostride % z) {
        PyErr_SetString(PyExc_ValueError, "out must be aligned to its item size");
        goto fail;
    }
    {
        const Variant *v = current;
        Py_BEGIN_ALLOW_THREADS v->decode[z == 8][ma.code](&ma, (char *)vo.buf, ostride);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&va);
    PyBuffer_Release(&vo);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&va);
    PyBuffer_Release(&vo);
    return NULL;
}

static PyObject *py_isa(PyObject *self, PyObject *noargs) { return PyUnicode_FromString(current->name); }

static PyObject *py_isas(PyObject *self, PyObject *noargs) {
    PyObject *t = PyList_New(0);
    if (t == NULL) return NULL;
    for (int i = 0; i < N_VARIANTS; i++)
        if (supported(&VARIANTS[i])) {
            PyObject *s = PyUnicode_FromString(VARIANTS[i].name);
            if (s == NULL || PyList_Append(t, s) < 0) {
                Py_XDECREF(s);
                Py_DECREF(t);
                return NULL;
            }
            Py_DECREF(s);
        }
    PyObject *r = PyList_AsTuple(t);
    Py_DECREF(t);
    return r;
}

static PyObject *py_compiled_isas(PyObject *self, PyObject *noargs) {
    PyObject *t = PyTuple_New(N_VARIANTS);
    if (t == NULL) return NULL;
    for (int i = 0; i < N_VARIANTS; i++) {
        PyObject *s = PyUnicode_FromString(VARIANTS[i].name);
        if (s == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, s);
    }
    return t;
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    for (int i = 0; i < N_VARIANTS; i++)
        if (strcmp(VARIANTS[i].name, name) == 0) {
            if (!supported(&VARIANTS[i])) {
                PyErr_Format(PyExc_ValueError, "this CPU cannot run the %s variant", name);
                return NULL;
            }
            current = &VARIANTS[i];
            Py_RETURN_NONE;
        }
    PyErr_Format(PyExc_ValueError, "no variant named %s", name);
    return NULL;
}

static PyMethodDef methods[] = {
    {"pair_sums", py_pair_sums, METH_VARARGS, "pair_sums(a, a_code, b, b_code) -> (<a,a>, <b,b>, <a,b>)"},
    {"next_sums", py_next_sums, METH_VARARGS, "next_sums(a, a_code, b, b_code) -> (<b,b>, <a,b>)"},
    {"norm_sum", py_norm_sum, METH_VARARGS, "norm_sum(a, a_code) -> <a,a>"},
    {"diff_sums", py_diff_sums, METH_VARARGS,
     "diff_sums(a, a_code, b, b_code) -> (<a,a>, <b,b>, <a,b>, |b-a|^2, equal, max|b-a|)"},
    {"decode", py_decode, METH_VARARGS, "decode(a, a_code, out): decoded values into float32/float64 out"},
    {"isa", py_isa, METH_NOARGS, "The instruction-set variant in use."},
    {"isas", py_isas, METH_NOARGS, "The variants this CPU can run, the default first."},
    {"compiled_isas", py_compiled_isas, METH_NOARGS, "The variants in this build, in order of preference."},
    {"set_isa", py_set_isa, METH_VARARGS, "set_isa(name): use another variant (tests, benchmarks)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ckernel", "Fused decode + sums over raw tensor bytes (see layerdiff.engine.fused).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__ckernel(void) {
    for (int i = 0; i < N_VARIANTS; i++)
        if (supported(&VARIANTS[i])) {
            current = &VARIANTS[i];
            break;
        }
    return PyModule_Create(&module);
}
