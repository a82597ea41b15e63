/* Steps of a few rows (2 to engine/single_row.py's MAX_ROWS) on the pool of
 * single_row.c, which includes this file after its pool and GEMV: a GEMM that reads
 * each weight once for all rows, and decode attention split by sequence. */

/* Few-row GEMM, y[m, n] = x[m, :] . w[n, :] (+ b[n]): each thread streams its share
 * of w's rows once; tiles of 4 rows of w by MR rows of x keep 4 x MR accumulators in
 * registers, so a weight load feeds MR FMAs and an x load (from L1/L2) feeds 4. */
typedef struct {
    const float *w, *x, *b;
    float *y;
    int64_t m, n, k;
} gemm_args;

#define GEMM_TILE(MR)                                                                        \
    static void tile4x##MR(const gemm_args *a, int64_t n0, int64_t m0) {                      \
        const int64_t k = a->k, k8 = k & ~(int64_t)7;                                         \
        const float *w = a->w + n0 * k, *x = a->x + m0 * k;                                   \
        __m256 acc[4][MR];                                                                    \
        for (int i = 0; i < 4; i++)                                                           \
            for (int j = 0; j < MR; j++) acc[i][j] = _mm256_setzero_ps();                     \
        for (int64_t c = 0; c < k8; c += 8) {                                                 \
            __m256 xv[MR];                                                                    \
            for (int j = 0; j < MR; j++) xv[j] = _mm256_loadu_ps(x + j * k + c);              \
            if ((c & 15) == 0 && m0 == 0)                                                     \
                for (int i = 0; i < 4; i++) _mm_prefetch((const char *)(w + (4 + i) * k + c), _MM_HINT_T0); \
            for (int i = 0; i < 4; i++) {                                                     \
                __m256 wv = _mm256_loadu_ps(w + i * k + c);                                   \
                __asm__("" : "+x"(wv)); /* in a register: not re-loaded by each FMA */        \
                for (int j = 0; j < MR; j++) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]); \
            }                                                                                 \
        }                                                                                     \
        for (int i = 0; i < 4; i++)                                                           \
            for (int j = 0; j < MR; j++)                                                      \
                a->y[(m0 + j) * a->n + n0 + i] =                                              \
                    row_dot(w + i * k, x + j * k, k8, k, acc[i][j]) + (a->b ? a->b[n0 + i] : 0.0f); \
    }
GEMM_TILE(1)
GEMM_TILE(2)
GEMM_TILE(3)

static void gemm_part(void *arg, int part, int parts) {
    const gemm_args *a = arg;
    const int64_t per = ((a->n + parts - 1) / parts + 3) & ~(int64_t)3;
    const int64_t r0 = per * part, r1 = r0 + per < a->n ? r0 + per : a->n;
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        int64_t m = 0;
        for (; m + 3 <= a->m; m += 3) tile4x3(a, r, m);
        if (a->m - m == 2) tile4x2(a, r, m);
        if (a->m - m == 1) tile4x1(a, r, m);
    }
    for (; r < r1; r++) /* the last rows of w: one x row at a time */
        for (int64_t m = 0; m < a->m; m++) {
            gemv_args g = {a->w + r * a->k, a->x + m * a->k, a->b ? a->b + r : NULL,
                           a->y + m * a->n + r, 1, a->k};
            gemv_rows(&g, 0, 1);
        }
}

/* y[m, n] = x[m, k] w[n, k]^T (+ b[n] when b is not NULL), over the pool; the rows of w
 * are split between threads, so each weight is read from memory once. */
void gemm(const float *w, const float *x, const float *b, float *y, int64_t m, int64_t n, int64_t k) {
    gemm_args a = {w, x, b, y, m, n, k};
    run(gemm_part, &a);
}

typedef struct {
    const float *q, *kc, *vc;
    float *out;
    const int32_t *ctx, *tables;
    int64_t stride, batch, kvh, group, d, bs, nb;
    float scale;
    _Atomic int failed;
} attn_args;

static void attn_part(void *arg, int part, int parts) {
    attn_args *a = arg;
    const int64_t b0 = a->batch * part / parts, b1 = a->batch * (part + 1) / parts;
    if (b0 < b1 && paged_decode(a->q, a->kc, a->vc, a->out, a->ctx, a->tables, a->stride, b0, b1,
                                a->kvh, a->group, a->d, a->bs, a->nb, a->scale) != 0)
        atomic_store(&a->failed, 1);
}

/* paged_decode over all `batch` sequences, split between the pool's threads. */
int paged_decode_pool(const float *q, const float *k_cache, const float *v_cache, float *out,
                      const int32_t *ctx, const int32_t *tables, int64_t table_stride,
                      int64_t batch, int64_t kvh, int64_t group, int64_t d, int64_t bs,
                      int64_t nb, float scale) {
    attn_args a = {q, k_cache, v_cache, out, ctx, tables, table_stride, batch, kvh, group, d,
                   bs, nb, scale, 0};
    run(attn_part, &a);
    return atomic_load(&a.failed) ? -1 : 0;
}
