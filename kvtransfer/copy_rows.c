/* Many byte-range copies in one call (the local transport's direct path: one range per
 * run of blocks per layer and part). dst[i], src[i] are addresses, len[i] byte counts;
 * the ranges do not overlap (two different pools). One foreign call instead of one
 * ctypes.memmove per range, and the GIL is let go for all of them. */
#include <stdint.h>
#include <string.h>

void copy_rows(int64_t n, const int64_t *dst, const int64_t *src, const int64_t *len) {
    for (int64_t i = 0; i < n; i++) memcpy((void *)dst[i], (const void *)src[i], (size_t)len[i]);
}
