/* Single-row (batch-1) decode on the CPU, fp32: a GEMV over a small thread pool, and a
 * whole dense decoder layer in one call (engine/fused_layer.py says when it applies).
 *
 * Pool: the caller's thread plus `threads - 1` workers. A worker spins for `spin_ns`
 * after its last task (a step's GEMVs come ~10-100 us apart), then sleeps on a
 * condition variable, so an idle engine leaves the cores to others.
 *
 * Layouts: weights [rows, cols] C-contiguous (nn.Linear's); KV caches [num_blocks,
 * block_size, kv_heads, head_dim] (engine/attention/reference.py); rope tables are one
 * position's full-width cos and signed sin (RotaryEmbedding.tables).
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "attention/paged_decode.c"

typedef void (*task_fn)(void *arg, int part, int parts);

static struct {
    pthread_t tid[63];
    int workers;
    pid_t pid;
    int64_t spin_ns;
    _Atomic uint64_t gen;
    _Atomic int done, sleeping;
    task_fn fn;
    void *arg;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void *worker(void *p) {
    const int part = (int)(intptr_t)p;
    uint64_t seen = 0;
    for (;;) {
        int64_t t0 = now_ns();
        uint64_t g;
        while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen) {
            _mm_pause();
            if (now_ns() - t0 < pool.spin_ns) continue;
            pthread_mutex_lock(&pool.mu);
            atomic_fetch_add(&pool.sleeping, 1);
            while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            atomic_fetch_sub(&pool.sleeping, 1);
            pthread_mutex_unlock(&pool.mu);
            t0 = now_ns();
        }
        seen = g;
        pool.fn(pool.arg, part, pool.workers + 1);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
    return NULL;
}

/* Starts the pool (once per process; a forked child runs on its own thread alone).
 * Returns the number of threads that run tasks. */
int pool_start(int threads, int64_t spin_ns) {
    if (pool.pid == getpid()) return pool.workers + 1;
    pool.pid = getpid();
    pool.workers = 0;
    pool.spin_ns = spin_ns;
    for (int i = 0; i < threads - 1 && i < 63; i++) {
        if (pthread_create(&pool.tid[i], NULL, worker, (void *)(intptr_t)(i + 1)) != 0) break;
        pthread_detach(pool.tid[i]);
        pool.workers++;
    }
    return pool.workers + 1;
}

static void run(task_fn fn, void *arg) {
    if (pool.workers == 0 || pool.pid != getpid()) {
        fn(arg, 0, 1);
        return;
    }
    pool.fn = fn;
    pool.arg = arg;
    atomic_store(&pool.done, 0);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release);
    if (atomic_load(&pool.sleeping)) pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    fn(arg, 0, pool.workers + 1);
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < pool.workers) _mm_pause();
}

typedef struct {
    const float *w, *x, *b;
    float *y;
    int64_t rows, cols;
} gemv_args;

static float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

static float row_dot(const float *w, const float *x, int64_t k, int64_t cols, __m256 acc) {
    float s = hsum(acc);
    for (; k < cols; k++) s += w[k] * x[k];
    return s;
}

/* Rows [r0, r1) of y = W x (+ b), four rows at a time (one pass over x per four). */
static void gemv_rows(const gemv_args *a, int64_t r0, int64_t r1) {
    const int64_t c = a->cols, c8 = c & ~(int64_t)7;
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        const float *w0 = a->w + r * c, *w1 = w0 + c, *w2 = w1 + c, *w3 = w2 + c;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t k = 0; k < c8; k += 8) {
            const __m256 xv = _mm256_loadu_ps(a->x + k);
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xv, s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xv, s1);
            s2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xv, s2);
            s3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xv, s3);
        }
        const __m256 acc[4] = {s0, s1, s2, s3};
        for (int j = 0; j < 4; j++)
            a->y[r + j] = row_dot(a->w + (r + j) * c, a->x, c8, c, acc[j]) + (a->b ? a->b[r + j] : 0.0f);
    }
    for (; r < r1; r++) {
        __m256 s = _mm256_setzero_ps();
        const float *w = a->w + r * c;
        for (int64_t k = 0; k < c8; k += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(a->x + k), s);
        a->y[r] = row_dot(w, a->x, c8, c, s) + (a->b ? a->b[r] : 0.0f);
    }
}

static void gemv_part(void *arg, int part, int parts) {
    const gemv_args *a = arg;
    const int64_t per = ((a->rows + parts - 1) / parts + 3) & ~(int64_t)3;
    const int64_t r0 = per * part, r1 = r0 + per < a->rows ? r0 + per : a->rows;
    if (r0 < r1) gemv_rows(a, r0, r1);
}

/* y[rows] = w[rows, cols] x[cols] (+ b[rows] when b is not NULL), over the pool. */
void gemv(const float *w, const float *x, const float *b, float *y, int64_t rows, int64_t cols) {
    gemv_args a = {w, x, b, y, rows, cols};
    run(gemv_part, &a);
}

static void rms_norm(const float *x, const float *w, float *out, int64_t n, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

/* res_out = x (+ res when not NULL); out = rms_norm(res_out) * w: RMSNorm with the
 * residual add of engine/layers.py, for one row of n. */
void add_rms_norm(const float *x, const float *res, const float *w, float *out, float *res_out,
                  int64_t n, float eps) {
    for (int64_t i = 0; i < n; i++) res_out[i] = res ? x[i] + res[i] : x[i];
    rms_norm(res_out, w, out, n, eps);
}

/* x (d wide) rotated in place by one position's half-width tables (rotate-half). */
static void rope(float *x, const float *cos, const float *sin, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i] + a * sin[i];
    }
}

#include "few_rows.c" /* steps of 2 to 32 rows: GEMM, pooled attention */

/* Pointer slots and sizes of decode_layer (engine/fused_stack.py fills them). */
enum { X, RES, OUT, RES_OUT, LN1, WQKV, BQKV, QN, KN, COS, SIN, KC, VC, TABLE, WO, LN2, WGU, WD,
       SCRATCH };
enum { HAS_RES, HIDDEN, NH, NKV, D, INTER, SLOT, CTX, NB, BS, TABLE_LEN };
enum { N_PTRS = SCRATCH + 1, N_DIMS = TABLE_LEN + 1 };

/* One dense decoder layer for one token: out, res_out = layer(x, res) as
 * engine/model.py's DecoderLayer computes them (pre-norm attention with the new K/V
 * stored at `slot`, then a SwiGLU MLP). Scratch: 2 hidden + (nh + 2 nkv) d + nh d +
 * 2 inter floats. Returns 0, or -1 when the slot, the context or a table entry is
 * outside the cache (checked before anything is stored) or memory ran out. */
int decode_layer(const int64_t *ptr, const int64_t *dim, float eps, float scale) {
#define F(i) ((float *)(intptr_t)ptr[i])
    const int64_t hid = dim[HIDDEN], nh = dim[NH], nkv = dim[NKV], d = dim[D];
    const int64_t inter = dim[INTER], bs = dim[BS], nb = dim[NB], slot = dim[SLOT];
    const int64_t ctx = dim[CTX], qkv_rows = (nh + 2 * nkv) * d;
    if (slot < 0 || slot >= nb * bs || ctx < 1 || ctx > dim[TABLE_LEN] * bs) return -1;
    for (int64_t i = 0; i < (ctx + bs - 1) / bs; i++)
        if (block_of((const int32_t *)(intptr_t)ptr[TABLE], i * bs, bs, nb) < 0) return -1;
    float *res = F(RES_OUT), *xn = F(SCRATCH), *qkv = xn + hid, *attn = qkv + qkv_rows;
    float *o = attn + nh * d, *gu = o + hid;
    const float *x = F(X), *prev = F(RES);
    for (int64_t i = 0; i < hid; i++) res[i] = dim[HAS_RES] ? x[i] + prev[i] : x[i];
    rms_norm(res, F(LN1), xn, hid, eps);
    gemv(F(WQKV), xn, F(BQKV), qkv, qkv_rows, hid);
    for (int64_t h = 0; h < nh + nkv; h++) {
        float *head = qkv + h * d, *norm = h < nh ? F(QN) : F(KN);
        if (norm != NULL) rms_norm(head, norm, head, d, eps);
        rope(head, F(COS), F(SIN), d);
    }
    float *k_row = F(KC) + slot * nkv * d, *v_row = F(VC) + slot * nkv * d;
    memcpy(k_row, qkv + nh * d, sizeof(float) * nkv * d);
    memcpy(v_row, qkv + (nh + nkv) * d, sizeof(float) * nkv * d);
    const int32_t ctx32 = (int32_t)ctx;
    if (paged_decode(qkv, F(KC), F(VC), attn, &ctx32, (const int32_t *)F(TABLE), 0, 0, 1, nkv,
                     nh / nkv, d, bs, nb, scale) != 0)
        return -1;
    gemv(F(WO), attn, NULL, o, hid, nh * d);
    for (int64_t i = 0; i < hid; i++) res[i] += o[i];
    rms_norm(res, F(LN2), xn, hid, eps);
    gemv(F(WGU), xn, NULL, gu, 2 * inter, hid);
    for (int64_t i = 0; i < inter; i++) gu[i] = gu[i] / (1.0f + expf(-gu[i])) * gu[inter + i];
    gemv(F(WD), gu, NULL, F(OUT), hid, inter);
    return 0;
#undef F
}

/* n layers in a row, one row of decode_layer's slots each (ptr: n x N_PTRS, dim: n x
 * N_DIMS); the caller points layer i's x/res at layer i-1's out/res_out. Returns 0, or
 * -1 - i when layer i failed (nothing of layer i stored; layers before it ran). */
int decode_layers(const int64_t *ptr, const int64_t *dim, int64_t n, float eps, float scale) {
    for (int64_t i = 0; i < n; i++)
        if (decode_layer(ptr + i * N_PTRS, dim + i * N_DIMS, eps, scale) != 0) return (int)(-1 - i);
    return 0;
}
