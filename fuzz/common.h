/*
 * Shared by the native fuzz targets: a byte reader over the fuzzer's input, a
 * fake guest memory (a struct vn_mem whose regions are views of one buffer the
 * input fills, no mmap, no file), and the oracle helpers every target uses.
 *
 * Oracle failures call FUZZ_CHECK, which aborts with the condition: libFuzzer
 * then saves the input like any other crash.
 */
#ifndef VHOST_FUZZ_COMMON_H
#define VHOST_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

/* The harness's own loops over buffers are not what is being explored:
 * keep them out of the coverage feedback (and its per-comparison cost); not
 * inlined, or the caller's instrumentation would apply to them again. */
#define FUZZ_NOCOV __attribute__((no_sanitize("coverage"), noinline))

#define FUZZ_CHECK(cond) do { \
        if (!(cond)) { \
            fprintf(stderr, "%s:%d: oracle failed: %s\n", __FILE__, __LINE__, #cond); \
            abort(); \
        } \
    } while (0)

/* Reads past the end yield zeros: a short input is a valid input with
 * defaults, so that the fuzzer never wastes executions on rejected lengths. */
struct reader {
    const uint8_t *p;
    size_t n, pos;
};

static inline uint8_t rd_u8(struct reader *r)
{
    return r->pos < r->n ? r->p[r->pos++] : 0;
}

static inline uint16_t rd_u16(struct reader *r)
{
    uint16_t lo = rd_u8(r);
    return (uint16_t)(lo | rd_u8(r) << 8);
}

static inline uint32_t rd_u32(struct reader *r)
{
    uint32_t lo = rd_u16(r);
    return lo | (uint32_t)rd_u16(r) << 16;
}

static inline uint64_t rd_u64(struct reader *r)
{
    uint64_t lo = rd_u32(r);
    return lo | (uint64_t)rd_u32(r) << 32;
}

/* Copy up to `len` bytes into dst, zero-filling what the input lacks. */
static inline void rd_bytes(struct reader *r, void *dst, size_t len)
{
    size_t have = r->pos < r->n ? r->n - r->pos : 0;
    if (have > len) have = len;
    memcpy(dst, r->p + r->pos, have);
    memset((uint8_t *)dst + have, 0, len - have);
    r->pos += have;
}

static inline int rd_done(const struct reader *r) { return r->pos >= r->n; }

/* ------------------------------------------------------------------ */
/* fake guest memory                                                   */
/* ------------------------------------------------------------------ */

/*
 * The layouts a guest's memory table can have that matter to translation:
 * one region; two regions adjacent in GPA but not in host memory (a buffer
 * crossing them must split into two iovecs); a region far above 4 GiB after a
 * hole (PC-like); and two regions aliasing the same host bytes.
 */
enum { LAYOUT_ONE, LAYOUT_ADJACENT, LAYOUT_HOLE, LAYOUT_ALIAS, LAYOUT_COUNT };

#define HIGH_GPA 0x100000000ull

struct fake_region { uint64_t gpa, size; uint8_t *host; };

/* Fills the first `n` regions of a struct vn_mem-compatible table; callers pass
 * their vn_mem's regions through fake_mem_apply (core.h's struct is not
 * visible to every target). */
static inline int fake_layout(int layout, uint8_t *buf, uint64_t len, struct fake_region *out)
{
    uint64_t half = len / 2, quarter = len / 4;
    switch (layout % LAYOUT_COUNT) {
    case LAYOUT_ONE:
        out[0] = (struct fake_region){ 0, len, buf };
        return 1;
    case LAYOUT_ADJACENT:
        /* GPA-adjacent, host-swapped: the second GPA half is the first host half. */
        out[0] = (struct fake_region){ 0, half, buf + half };
        out[1] = (struct fake_region){ half, len - half, buf };
        return 2;
    case LAYOUT_HOLE:
        out[0] = (struct fake_region){ 0, half, buf };
        out[1] = (struct fake_region){ HIGH_GPA, len - half, buf + half };
        return 2;
    default:
        out[0] = (struct fake_region){ 0, len, buf };
        out[1] = (struct fake_region){ HIGH_GPA, quarter, buf + quarter };
        out[2] = (struct fake_region){ HIGH_GPA + 0x10000000ull, quarter, buf };
        return 3;
    }
}

/* Is [p, p+len) inside one of the regions' host ranges? */
FUZZ_NOCOV static inline int fake_contains(const struct fake_region *r, int n, const void *p, uint64_t len)
{
    uintptr_t a = (uintptr_t)p;
    for (int i = 0; i < n; i++) {
        uintptr_t h = (uintptr_t)r[i].host;
        if (a >= h && a - h <= r[i].size && len <= r[i].size - (a - h)) return 1;
    }
    return 0;
}

FUZZ_NOCOV static inline uint64_t iov_total(const struct iovec *iov, uint32_t n)
{
    uint64_t t = 0;
    for (uint32_t i = 0; i < n; i++) t += iov[i].iov_len;
    return t;
}

/* A 64-bit FNV-1a digest: cheap enough to take over every readable buffer
 * before and after a device handled a request. */
FUZZ_NOCOV static inline uint64_t digest(uint64_t h, const void *p, size_t len)
{
    const uint8_t *b = p;
    if (!h) h = 1469598103934665603ull;
    for (size_t i = 0; i < len; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

#endif
