/* Paged decode attention on the CPU, fp32: one query token per sequence against its
 * cached keys, read in place from the paged cache (no gathered copy of K/V).
 *
 * Layouts (engine/attention/reference.py): q and out [B, kvh * group, d]; caches
 * [num_blocks, block_size, kvh, d]; all C-contiguous. tables[b * table_stride + i] is
 * sequence b's i-th block, ctx[b] its number of keys. Sequences [b0, b1) are done here
 * (callers split a batch over threads). Each token's K (and V) row holds every KV head
 * contiguously, so the loops run over tokens outside and heads inside: the cache is
 * read block by block, in order, once for K and once for V.
 *
 * Returns 0, or -1 when a table entry is not a block of the cache (nothing written for
 * that sequence past the check) or scratch memory could not be had.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static float dot(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static int64_t block_of(const int32_t *table, int64_t t, int64_t bs, int64_t nb) {
    int64_t blk = table[t / bs];
    return (blk < 0 || blk >= nb) ? -1 : blk;
}

int paged_decode(const float *q, const float *k_cache, const float *v_cache, float *out,
                 const int32_t *ctx, const int32_t *tables, int64_t table_stride,
                 int64_t b0, int64_t b1, int64_t kvh, int64_t group, int64_t d,
                 int64_t bs, int64_t nb, float scale) {
    const int64_t heads = kvh * group, row = kvh * d;
    for (int64_t b = b0; b < b1; b++) {
        const int64_t n = ctx[b];
        const float *qb = q + b * heads * d;
        float *ob = out + b * heads * d;
        memset(ob, 0, sizeof(float) * heads * d);
        if (n <= 0) continue;
        const int32_t *table = tables + b * table_stride;
        float *scores = malloc(sizeof(float) * heads * n); /* [t][head] */
        if (scores == NULL) return -1;
        for (int64_t t = 0; t < n; t++) {
            int64_t blk = block_of(table, t, bs, nb);
            if (blk < 0) { free(scores); return -1; }
            const float *k = k_cache + (blk * bs + t % bs) * row;
            for (int64_t h = 0; h < heads; h++)
                scores[t * heads + h] = dot(qb + h * d, k + (h / group) * d, d) * scale;
        }
        for (int64_t h = 0; h < heads; h++) { /* softmax over t, in place */
            float m = -INFINITY, sum = 0.0f;
            for (int64_t t = 0; t < n; t++) m = fmaxf(m, scores[t * heads + h]);
            for (int64_t t = 0; t < n; t++) {
                float p = expf(scores[t * heads + h] - m);
                scores[t * heads + h] = p;
                sum += p;
            }
            for (int64_t t = 0; t < n; t++) scores[t * heads + h] /= sum;
        }
        for (int64_t t = 0; t < n; t++) {
            const float *v = v_cache + (block_of(table, t, bs, nb) * bs + t % bs) * row;
            for (int64_t h = 0; h < heads; h++) {
                const float p = scores[t * heads + h], *vh = v + (h / group) * d;
                float *o = ob + h * d;
#pragma omp simd
                for (int64_t i = 0; i < d; i++) o[i] += p * vh[i];
            }
        }
        free(scores);
    }
    return 0;
}
