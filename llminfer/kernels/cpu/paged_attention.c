/* Paged attention on the CPU: every query row attends over its sequence's cache blocks in place.
 *
 * The torch reference gathers a sequence's blocks into a new tensor before its matmuls: the cache is
 * read, written and read again. Here each (row, KV head) task reads its keys and values once, straight
 * out of the blocks its block table names, for the GROUP query heads that share them (GQA).
 *
 * Row r belongs to sequence row_seq[r] and sees the keys at positions 0 .. row_len[r] - 1: a decode
 * row sees its whole sequence, a prefill row only up to its own position (causal). Softmax in three
 * passes over one row's scores: scores and their max, exponentials and their sum, weighted values.
 * The scores of one row stay in L1/L2, so the second and third passes cost little next to the loads.
 *
 * HEAD_DIM and GROUP (query heads per KV head) are compile-time constants (-DHEAD_DIM=.. -DGROUP=..),
 * one library per model shape: the compiler then unrolls the inner loops and keeps a task's queries
 * and accumulators in vector registers. Layouts (contiguous): q, out [rows, heads, HEAD_DIM] fp32;
 * caches [blocks, block_size, kv_heads, ROW]; block_tables [seqs, table_width] (int32).
 *
 * KV_FORMAT (default 0) is the cache's element: 0 fp32 (ROW = HEAD_DIM); or one-byte codes followed by
 * the row's fp32 scale (ROW = HEAD_DIM + 4, `llminfer.kv.quantized`): 1 int8, 2 fp8 e4m3, 3 fp8 e5m2.
 * A quantized row's dot product runs on the codes and is multiplied by the scale once.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(HEAD_DIM) || !defined(GROUP)
#error "build with -DHEAD_DIM=<head_dim> -DGROUP=<query heads per KV head>"
#endif
#ifndef KV_FORMAT
#define KV_FORMAT 0
#endif

#if KV_FORMAT == 0
typedef float kv_t;
#define ROW HEAD_DIM
static inline float code_value(float x) { return x; }
static inline float row_scale(const kv_t *row) { (void)row; return 1.0f; }
#else
#define ROW (HEAD_DIM + 4)
static inline float row_scale(const void *row) {
    float scale;
    memcpy(&scale, (const uint8_t *)row + HEAD_DIM, sizeof scale);   /* the 4 bytes after the codes */
    return scale;
}
#if KV_FORMAT == 1
typedef int8_t kv_t;
static inline float code_value(int8_t code) { return (float)code; }
#else
typedef uint8_t kv_t;
#if KV_FORMAT == 2       /* fp8 e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits */
#define EXP_BITS 4
#define MAN_BITS 3
#elif KV_FORMAT == 3     /* fp8 e5m2: sign, 5 exponent bits (bias 15), 2 mantissa bits */
#define EXP_BITS 5
#define MAN_BITS 2
#else
#error "KV_FORMAT must be 0 (fp32), 1 (int8), 2 (fp8 e4m3) or 3 (fp8 e5m2)"
#endif
#define BIAS ((1 << (EXP_BITS - 1)) - 1)
/* An fp8 code as a float, by moving its fields into an fp32's bit pattern: no table, so gcc can vectorise
 * it. Exponent 0 is subnormal: mantissa x 2^(1 - BIAS - MAN_BITS). The cache never holds NaN or infinity
 * (codes are clamped to the largest finite value when written). */
static inline float code_value(uint8_t code) {
    const uint32_t exponent = (code >> MAN_BITS) & ((1u << EXP_BITS) - 1), mantissa = code & ((1u << MAN_BITS) - 1);
    const uint32_t bits = ((exponent + 127 - BIAS) << 23) | (mantissa << (23 - MAN_BITS));
    float normal;
    memcpy(&normal, &bits, sizeof normal);
    const float magnitude = exponent ? normal : (float)mantissa * ldexpf(1.0f, 1 - BIAS - MAN_BITS);
    return code & 0x80 ? -magnitude : magnitude;
}
#endif
#endif

/* Blocks lie anywhere in the cache, so the hardware prefetcher, which follows addresses, cannot guess the
 * next one. While a task reads row t of a block it asks for row t of the next block in its table. */
static inline void prefetch_row(const kv_t *row) {
    for (int d = 0; d < ROW * (int)sizeof(kv_t); d += 64) __builtin_prefetch((const char *)row + d);   /* a cache line */
}

/* One task: GROUP query heads q [GROUP][HEAD_DIM] over the first len keys of one KV head. Returns 0, or
 * 2 when the block table names a block outside the cache. */
static int attend(const float *restrict q, const kv_t *restrict k_cache, const kv_t *restrict v_cache,
                  const int32_t *restrict table, int64_t len, int64_t block_size, int64_t num_blocks,
                  int64_t slot_stride, float scale, float *restrict scores, int64_t capacity,
                  float *restrict out) {
    float query[GROUP][HEAD_DIM];
    for (int g = 0; g < GROUP; g++)
        for (int d = 0; d < HEAD_DIM; d++) query[g][d] = q[g * HEAD_DIM + d] * scale;
    for (int64_t start = 0; start < len; start += block_size)
        if (table[start / block_size] < 0 || table[start / block_size] >= num_blocks) return 2;

    /* Pass 1: the scores q.k of every visible key, block by block. */
    for (int64_t start = 0; start < len; start += block_size) {
        const int64_t block = start / block_size;
        const kv_t *keys = k_cache + table[block] * block_size * slot_stride;
        const kv_t *next = start + block_size < len ? k_cache + table[block + 1] * block_size * slot_stride : keys;
        const int64_t n = len - start < block_size ? len - start : block_size;
        for (int64_t t = 0; t < n; t++) {
            const kv_t *key = keys + t * slot_stride;
            prefetch_row(next + t * slot_stride);
            float k_values[HEAD_DIM];
            for (int d = 0; d < HEAD_DIM; d++) k_values[d] = code_value(key[d]);
            const float k_scale = row_scale(key);
            for (int g = 0; g < GROUP; g++) {
                float dot = 0.0f;
                for (int d = 0; d < HEAD_DIM; d++) dot += query[g][d] * k_values[d];
                scores[g * capacity + start + t] = dot * k_scale;
            }
        }
    }
    /* Pass 2: exponentials relative to each head's max (so none overflows) and their sum. */
    float inv_sum[GROUP];
    for (int g = 0; g < GROUP; g++) {
        float *s = scores + g * capacity;
        float max = s[0], sum = 0.0f;
        for (int64_t i = 1; i < len; i++) max = s[i] > max ? s[i] : max;
        for (int64_t i = 0; i < len; i++) {
            s[i] = expf(s[i] - max);
            sum += s[i];
        }
        inv_sum[g] = 1.0f / sum;
    }
    /* Pass 3: the probability-weighted sum of the values, read block by block like the keys. */
    float acc[GROUP][HEAD_DIM] = {{0.0f}};
    for (int64_t start = 0; start < len; start += block_size) {
        const int64_t block = start / block_size;
        const kv_t *values = v_cache + table[block] * block_size * slot_stride;
        const kv_t *next = start + block_size < len ? v_cache + table[block + 1] * block_size * slot_stride : values;
        const int64_t n = len - start < block_size ? len - start : block_size;
        for (int64_t t = 0; t < n; t++) {
            const kv_t *value = values + t * slot_stride;
            prefetch_row(next + t * slot_stride);
            float v_values[HEAD_DIM];
            for (int d = 0; d < HEAD_DIM; d++) v_values[d] = code_value(value[d]);
            const float v_scale = row_scale(value);
            for (int g = 0; g < GROUP; g++) {
                const float p = scores[g * capacity + start + t] * v_scale;
                for (int d = 0; d < HEAD_DIM; d++) acc[g][d] += p * v_values[d];
            }
        }
    }
    for (int g = 0; g < GROUP; g++)
        for (int d = 0; d < HEAD_DIM; d++) out[g * HEAD_DIM + d] = acc[g][d] * inv_sum[g];
    return 0;
}

/* All rows x KV heads, spread over num_threads OpenMP threads. Returns 0, 1 (out of memory) or 2 (a
 * block id outside the cache). */
int llminfer_paged_attention(const float *restrict q, const kv_t *restrict k_cache,
                             const kv_t *restrict v_cache, const int32_t *restrict block_tables,
                             const int64_t *restrict row_seq, const int64_t *restrict row_len,
                             float *restrict out, int64_t num_rows, int64_t num_kv_heads, int64_t block_size,
                             int64_t num_blocks, int64_t table_width, float scale, int num_threads) {
    const int64_t num_heads = num_kv_heads * GROUP, slot_stride = num_kv_heads * ROW;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *scores = NULL;   /* this thread's [GROUP][capacity] scratch, grown when a row needs more */
        int64_t capacity = 0;
#pragma omp for schedule(dynamic, 4)
        for (int64_t task = 0; task < num_rows * num_kv_heads; task++) {
            const int64_t row = task / num_kv_heads, kv_head = task % num_kv_heads;
            const int64_t len = row_len[row];
            if (len > capacity) {
                free(scores);
                capacity = len < 256 ? 256 : len;
                scores = malloc(sizeof(float) * GROUP * capacity);
                if (scores == NULL) {
                    capacity = 0;
#pragma omp atomic write
                    failed = 1;
                    continue;
                }
            }
            const int64_t head = row * num_heads + kv_head * GROUP;
            int status = attend(q + head * HEAD_DIM, k_cache + kv_head * ROW, v_cache + kv_head * ROW,
                                block_tables + row_seq[row] * table_width, len, block_size, num_blocks,
                                slot_stride, scale, scores, capacity, out + head * HEAD_DIM);
            if (status != 0) {
#pragma omp atomic write
                failed = status;
            }
        }
        free(scores);
    }
    return failed;
}
