/* LocalSgd's one-pass MAS update on contiguous CPU buffers, loaded by mas_optim/_kernels.py.
 *
 * Each function reads every tensor once and writes each output once, where torch's ops take
 * three to five passes. The arithmetic is that of the single-tensor reference in
 * mas_optim/functional.py (and of torch.optim.SGD for the rest of the update), in the tensors'
 * own precision. Nothing here allocates, locks or keeps state.
 *
 * The *_many functions take a group of tensors and a thread count. Built with -fopenmp (only
 * where torch itself runs on GNU OpenMP, so the two share one thread team and never compete
 * for cores), they cut large tensors into slices run by that team; otherwise they run the
 * slices one after the other on the calling thread.
 */
#include <math.h>
#include <stdint.h>

/* A tensor is cut into at most nthreads slices of at least this many elements. */
#define MAS_PER_THREAD 65536

static int64_t mas_parts(int64_t n, int32_t nthreads) {
    int64_t parts = n / MAS_PER_THREAD;
    if (parts > nthreads) parts = nthreads;
    return parts < 1 ? 1 : parts;
}

static int64_t mas_slice(int64_t n, int64_t parts) {
    int64_t step = (n + parts - 1) / parts;
    return (step + 15) & ~(int64_t)15; /* slices start on 64-byte boundaries */
}

/* Runs CALL(lo, len) over the slices of [0, n), in parallel where built with OpenMP; ORs the
 * codes into code. */
#define MAS_SLICED(n, nthreads, code, CALL)                                                 \
    do {                                                                                     \
        const int64_t parts_ = mas_parts((n), (nthreads)), step_ = mas_slice((n), parts_);   \
        int32_t code_ = 0;                                                                   \
        _Pragma("omp parallel for num_threads(parts_) schedule(static) reduction(|:code_) if(parts_ > 1)") \
        for (int64_t s_ = 0; s_ < parts_; ++s_) {                                            \
            const int64_t lo = s_ * step_;                                                   \
            const int64_t len = (n) - lo < step_ ? (n) - lo : step_;                         \
            if (len > 0) code_ |= (CALL);                                                    \
        }                                                                                    \
        (code) |= code_;                                                                     \
    } while (0)

#define MAS_AT(T, x, lo) ((x) ? (T *)(x) + (lo) : (T *)0)

/* The loops run in blocks of MAS_BLOCK elements and, before each block, prefetch every stream
 * MAS_AHEAD bytes ahead. With five to seven streams the hardware prefetcher alone left one core
 * 10-30% short of the bandwidth torch's two- and three-stream passes reach on 4M-element
 * tensors (Intel Xeon, benchmarks/bench_step.py); hinting the lines ahead closes that. */
#define MAS_BLOCK 64
#define MAS_AHEAD 1024
#if defined(__GNUC__) || defined(__clang__)
#define MAS_PREFETCH(x, at, write) __builtin_prefetch((x) + (at), (write))
#else
#define MAS_PREFETCH(x, at, write) ((void)0)
#endif

/* Runs the statement ELEM (on index i) for i in [0, n): whole blocks with a constant trip count,
 * which the compiler vectorises and unrolls, then the rest; AHEAD(F, at) prefetches each
 * stream's line at element offset at. */
#define MAS_BLOCKED(T, AHEAD, F, ...)                                                           \
    do {                                                                                     \
        const int64_t line_ = 64 / (int64_t)sizeof(T), ahead_ = MAS_AHEAD / (int64_t)sizeof(T); \
        int64_t lo_ = 0;                                                                     \
        for (; lo_ + MAS_BLOCK <= n; lo_ += MAS_BLOCK) {                                     \
            if (lo_ + ahead_ + MAS_BLOCK <= n)                                               \
                for (int64_t at = lo_ + ahead_; at < lo_ + ahead_ + MAS_BLOCK; at += line_)  \
                    AHEAD(F, at);                                                            \
            for (int64_t i = lo_; i < lo_ + MAS_BLOCK; ++i) __VA_ARGS__                      \
        }                                                                                    \
        for (int64_t i = lo_; i < n; ++i) __VA_ARGS__                                        \
    } while (0)

enum {
    MAS_MOMENTUM = 1,  /* keep a momentum buffer b                            */
    MAS_FIRST = 2,     /* first step of b: b = d (torch.optim.SGD's b_1 = d_1) */
    MAS_NESTEROV = 4,
    MAS_PROXIMAL = 8,  /* the penalty by its proximal map, not its gradient   */
    MAS_DECAY = 16,    /* weight decay ≠ 0                                    */
};

/* LocalSgd's step (the math is in LocalSgd's docstring):
 *   d = gsign*g [+ wd*θ] [+ coef*Ω*(θ − θ*)]        coef = 2λ: the gradient of Eq. 3's penalty
 *   b = d (first step) or momentum*b + (1 − dampening)*d
 *   θ = θ − lr*(d + momentum*b if nesterov else b)
 *   [proximal: θ = θ* + (θ − θ*)/(1 + lr*coef*Ω), the proximal map of lr*λ*ΣΩ(θ − θ*)²]
 * The flags are compile-time constants in each specialisation, so every loop vectorises. */
#define MAS_SGD_AHEAD(F, at)                                                                 \
    do {                                                                                     \
        MAS_PREFETCH(p, at, 1); MAS_PREFETCH(g, at, 0);                                      \
        if ((F) & MAS_MOMENTUM) MAS_PREFETCH(b, at, 1);                                      \
        MAS_PREFETCH(omega, at, 0); MAS_PREFETCH(init, at, 0);                               \
    } while (0)

#define MAS_SGD_LOOP(T, F)                                                                   \
    MAS_BLOCKED(T, MAS_SGD_AHEAD, F, {                                                      \
        T theta = p[i];                                                                      \
        T d = gsign * g[i];                                                                  \
        if ((F) & MAS_DECAY) d += wd * theta;                                                \
        if (!((F) & MAS_PROXIMAL)) d += coef * omega[i] * (theta - init[i]);                 \
        if ((F) & MAS_MOMENTUM) {                                                            \
            T bi = ((F) & MAS_FIRST) ? d : momentum * b[i] + keep * d;                       \
            b[i] = bi;                                                                       \
            d = ((F) & MAS_NESTEROV) ? d + momentum * bi : bi;                               \
        }                                                                                    \
        theta -= lr * d;                                                                     \
        if ((F) & MAS_PROXIMAL)                                                              \
            theta = init[i] + (theta - init[i]) / ((T)1 + lr_coef * omega[i]);               \
        p[i] = theta;                                                                        \
    })

#define MAS_CASE(T, F) case F: MAS_SGD_LOOP(T, F); return 0;
#define MAS_CASES8(T, B) MAS_CASE(T, B + 0) MAS_CASE(T, B + 1) MAS_CASE(T, B + 2)              \
    MAS_CASE(T, B + 3) MAS_CASE(T, B + 4) MAS_CASE(T, B + 5) MAS_CASE(T, B + 6) MAS_CASE(T, B + 7)

#define MAS_SGD(T, NAME)                                                                     \
    int32_t NAME(T *restrict p, const T *restrict g, T *restrict b, const T *restrict omega, \
                 const T *restrict init, int64_t n, T lr, T momentum, T dampening, T wd,     \
                 T coef, T gsign, int32_t flags) {                                           \
        const T keep = (T)1 - dampening, lr_coef = lr * coef;                                \
        switch (flags) {                                                                     \
            MAS_CASES8(T, 0) MAS_CASES8(T, 8) MAS_CASES8(T, 16) MAS_CASES8(T, 24)            \
        }                                                                                    \
        return -1; /* unknown flags: nothing was written */                                  \
    }

/* The same update for k tensors in one call (one call per param group from Python).
 * args holds 7 rows of k int64: addresses of θ, g, b, Ω, θ*, then element counts and flags;
 * returns 0, or the first nonzero code of the single-tensor function. */
#define MAS_SGD_MANY(T, NAME, ONE)                                                           \
    int32_t NAME(int64_t k, const int64_t *args, int32_t nthreads, T lr, T momentum,        \
                 T dampening, T wd, T coef, T gsign) {                                       \
        for (int64_t j = 0; j < k; ++j) {                                                    \
            const int64_t n = args[5 * k + j];                                               \
            int32_t code = 0;                                                                \
            MAS_SLICED(n, nthreads, code,                                                    \
                       ONE(MAS_AT(T, args[j], lo), MAS_AT(T, args[k + j], lo),               \
                           MAS_AT(T, args[2 * k + j], lo), MAS_AT(T, args[3 * k + j], lo),   \
                           MAS_AT(T, args[4 * k + j], lo), len, lr, momentum, dampening, wd, \
                           coef, gsign, (int32_t)args[6 * k + j]));                          \
            if (code != 0) return code;                                                      \
        }                                                                                    \
        return 0;                                                                            \
    }

MAS_SGD(float, mas_sgd_f32)
MAS_SGD(double, mas_sgd_f64)
MAS_SGD_MANY(float, mas_sgd_many_f32, mas_sgd_f32)
MAS_SGD_MANY(double, mas_sgd_many_f64, mas_sgd_f64)

/* The interface version the loader checks, so a stale or foreign library is never called. */
int32_t mas_kernels_abi(void) { return 5; }

/* Whether the *_many functions run their slices on OpenMP threads. */
int32_t mas_kernels_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
