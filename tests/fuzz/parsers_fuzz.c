/*
 * parsers_fuzz.c: a standalone driver for native/tls_hello.c and
 * native/proxy_recv.c, built with sanitizers by tests/test_parsers.py (and by
 * `make fuzz`, also as a libFuzzer target when clang is there).
 *
 * Every input goes through both parsers, once whole and once for each of
 * its prefixes (see want_prefix), each time from a buffer that ends exactly where `len` says (the
 * bytes are copied to the end of a heap block), so a read past `len` is a
 * heap overflow AddressSanitizer reports. On top of the sanitizers it checks
 * the contract both parsers promise:
 *   - the result is one of the documented codes;
 *   - over the prefixes of an input, NEED_MORE (with len < need) until the
 *     first verdict, and from there on the very verdict and output of the
 *     whole input: the answer does not depend on how the bytes arrived;
 *   - NEED_MORE's `need` never passes the end the complete input shows;
 *   - OK/FOUND fields are within their bounds.
 * A violation prints the input's index and aborts.
 *
 *   parsers_fuzz PACK...          inputs as records: u32 length (little
 *                                 endian), bytes; "-" reads stdin
 *   parsers_fuzz --all-prefixes PACK...
 *                                 every prefix of every input (default: all
 *                                 of inputs up to 128 bytes, of longer ones
 *                                 the first and last 16 and every 7th)
 *   parsers_fuzz --mutate SECONDS PACK...
 *                                 then mutate random inputs (bit flips,
 *                                 cuts, splices, length bytes) for SECONDS
 *   parsers_fuzz --selftest-overread
 *                                 read one byte past a heap block: proves
 *                                 the sanitizer is live (must fail)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tls_hello.h"
#include "proxy_recv.h"

static uint64_t checked;

static void die(const char *what, uint64_t idx, uint32_t len, uint32_t k)
{
    fprintf(stderr, "parsers_fuzz: contract violated: %s (input %llu, len %u, prefix %u)\n",
            what, (unsigned long long)idx, len, k);
    abort();
}

/* the bytes, copied so that they end where the heap block ends */
static uint8_t *tail_copy(const uint8_t *data, uint32_t n)
{
    uint8_t *p = malloc(n ? n : 1);
    if (!p) {
        perror("malloc");
        exit(2);
    }
    memcpy(p, data, n);
    return p;
}

static int run_tls(const uint8_t *data, uint32_t n, struct ringd_hello_info *out)
{
    uint8_t *p = tail_copy(data, n);
    int rc = tls_hello_parse(n ? p : NULL, n, out);
    free(p);
    return rc;
}

static int run_proxy(const uint8_t *data, uint32_t n, struct ringd_proxy_info *out)
{
    uint8_t *p = tail_copy(data, n);
    int rc = proxy_recv_parse(n ? p : NULL, n, out);
    free(p);
    return rc;
}

/* Which prefixes to try: all of a short input; of a long one the first and
 * last 16 and every 7th in between, at an offset that changes from input to
 * input so that the corpus as a whole covers every residue. */
static int want_prefix(uint32_t k, uint32_t len, uint64_t idx, int all_prefixes)
{
    if (all_prefixes || len <= 128 || k < 16 || k + 16 >= len)
        return 1;
    return (k + idx) % 7 == 0;
}

static void check_tls(const uint8_t *data, uint32_t len, uint64_t idx, int all_prefixes)
{
    struct ringd_hello_info whole, part;
    int rc = run_tls(data, len, &whole);

    if (rc < RINGD_TLS_NEED_MORE || rc > RINGD_TLS_MALFORMED)
        die("tls: unknown result", idx, len, len);
    if (rc == RINGD_TLS_FOUND) {
        if (whole.name_len < 1 || whole.name_len > RINGD_TLS_NAME_MAX ||
            strlen((const char *)whole.name) != whole.name_len)
            die("tls: name length", idx, len, len);
        uint8_t again[256];
        if (tls_name_normalize(whole.name, whole.name_len, again) != whole.name_len ||
            memcmp(again, whole.name, whole.name_len) != 0)
            die("tls: name not normal", idx, len, len);
    }
    if ((rc == RINGD_TLS_FOUND || rc == RINGD_TLS_NO_SNI) &&
        (whole.hello_end > len || whole.hello_end > RINGD_TLS_MAX_EXAMINED ||
         whole.alpn_len > RINGD_TLS_ALPN_MAX || whole.records < 1 ||
         whole.records > RINGD_TLS_MAX_RECORDS))
        die("tls: field bounds", idx, len, len);
    if (rc == RINGD_TLS_NEED_MORE && whole.need <= len)
        die("tls: need <= len", idx, len, len);
    checked++;

    int decided = 0;
    for (uint32_t k = 0; k < len; k++) {
        if (!want_prefix(k, len, idx, all_prefixes))
            continue;
        int r = run_tls(data, k, &part);
        checked++;
        if (r == RINGD_TLS_NEED_MORE) {
            if (decided)
                die("tls: NEED_MORE after a verdict", idx, len, k);
            if (part.need <= k)
                die("tls: need <= len", idx, len, k);
            if ((rc == RINGD_TLS_FOUND || rc == RINGD_TLS_NO_SNI) && part.need > whole.hello_end)
                die("tls: need past the end", idx, len, k);
            continue;
        }
        decided = 1;
        if (r != rc || memcmp(&part, &whole, sizeof(part)) != 0)
            die("tls: a prefix gave another verdict", idx, len, k);
    }
}

static void check_proxy(const uint8_t *data, uint32_t len, uint64_t idx, int all_prefixes)
{
    struct ringd_proxy_info whole, part;
    int rc = run_proxy(data, len, &whole);

    if (rc < RINGD_PROXY_NEED_MORE || rc > RINGD_PROXY_MALFORMED)
        die("proxy: unknown result", idx, len, len);
    if (rc == RINGD_PROXY_OK) {
        if (whole.header_len < 15 || whole.header_len > len ||
            whole.header_len > RINGD_PROXY_V2_MAX || whole.src_len > RINGD_ADDR_MAX ||
            whole.dst_len > RINGD_ADDR_MAX || whole.src_len != whole.dst_len)
            die("proxy: field bounds", idx, len, len);
        if (whole.version == 1 && whole.header_len > RINGD_PROXY_V1_MAX)
            die("proxy: v1 line too long", idx, len, len);
        if ((whole.authority_off && whole.authority_off + whole.authority_len > whole.header_len) ||
            (whole.alpn_off && whole.alpn_off + whole.alpn_len > whole.header_len))
            die("proxy: TLV outside the header", idx, len, len);
    }
    if (rc == RINGD_PROXY_NEED_MORE && whole.need <= len)
        die("proxy: need <= len", idx, len, len);
    checked++;

    int decided = 0;
    for (uint32_t k = 0; k < len; k++) {
        if (!want_prefix(k, len, idx, all_prefixes))
            continue;
        int r = run_proxy(data, k, &part);
        checked++;
        if (r == RINGD_PROXY_NEED_MORE) {
            if (decided)
                die("proxy: NEED_MORE after a verdict", idx, len, k);
            if (part.need <= k)
                die("proxy: need <= len", idx, len, k);
            if (rc == RINGD_PROXY_OK && part.need > whole.header_len)
                die("proxy: need past the end", idx, len, k);
            continue;
        }
        decided = 1;
        if (r != rc || memcmp(&part, &whole, sizeof(part)) != 0)
            die("proxy: a prefix gave another verdict", idx, len, k);
    }
}

static void check_one(const uint8_t *data, uint32_t len, uint64_t idx, int all_prefixes)
{
    check_tls(data, len, idx, all_prefixes);
    check_proxy(data, len, idx, all_prefixes);
    uint8_t norm[256];
    int n = tls_name_normalize(data, len, norm);
    if (n > RINGD_TLS_NAME_MAX)
        die("name: too long", idx, len, len);
}

#ifdef RINGD_LIBFUZZER

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 3 * RINGD_TLS_MAX_EXAMINED)
        return 0;
    check_one(data, (uint32_t)size, 0, 0);
    return 0;
}

#else

struct input {
    uint8_t *p;
    uint32_t n;
};

static struct input *inputs;
static size_t ninputs, cap;

static void add_input(const uint8_t *p, uint32_t n)
{
    if (ninputs == cap) {
        cap = cap ? 2 * cap : 1024;
        inputs = realloc(inputs, cap * sizeof(*inputs));
        if (!inputs) {
            perror("realloc");
            exit(2);
        }
    }
    inputs[ninputs].p = malloc(n ? n : 1);
    if (!inputs[ninputs].p) {
        perror("malloc");
        exit(2);
    }
    memcpy(inputs[ninputs].p, p, n);
    inputs[ninputs].n = n;
    ninputs++;
}

static int read_pack(const char *path)
{
    FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
    uint8_t hdr[4];
    static uint8_t buf[1 << 20];

    if (!f) {
        perror(path);
        return -1;
    }
    while (fread(hdr, 1, 4, f) == 4) {
        uint32_t n = (uint32_t)hdr[0] | (uint32_t)hdr[1] << 8 | (uint32_t)hdr[2] << 16 |
                     (uint32_t)hdr[3] << 24;
        if (n > sizeof(buf) || fread(buf, 1, n, f) != n) {
            fprintf(stderr, "%s: truncated pack\n", path);
            return -1;
        }
        add_input(buf, n);
    }
    if (f != stdin)
        fclose(f);
    return 0;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void mutate_for(double seconds)
{
    static uint8_t buf[3 * RINGD_TLS_MAX_EXAMINED];
    struct timespec t0, t;
    uint64_t runs = 0;

    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        if ((double)(t.tv_sec - t0.tv_sec) + (double)(t.tv_nsec - t0.tv_nsec) / 1e9 > seconds)
            break;
        for (int batch = 0; batch < 64; batch++) {
            const struct input *in = &inputs[rnd() % ninputs];
            uint32_t n = in->n < sizeof(buf) ? in->n : (uint32_t)sizeof(buf);
            memcpy(buf, in->p, n);
            int edits = 1 + (int)(rnd() % 4);
            for (int e = 0; e < edits && n; e++) {
                uint32_t i = (uint32_t)(rnd() % n);
                switch (rnd() % 6) {
                case 0: buf[i] ^= (uint8_t)(1u << (rnd() % 8)); break;
                case 1: buf[i] = (uint8_t)rnd(); break;
                case 2: buf[i] = (rnd() & 1) ? 0xff : 0x00; break;
                case 3: n = i; break;                                   /* cut */
                case 4: {                                               /* splice */
                    const struct input *o = &inputs[rnd() % ninputs];
                    uint32_t j = o->n ? (uint32_t)(rnd() % o->n) : 0;
                    uint32_t m = o->n - j;
                    if (i + m > sizeof(buf))
                        m = (uint32_t)sizeof(buf) - i;
                    memcpy(buf + i, o->p + j, m);
                    n = i + m;
                    break;
                }
                default:                                                /* a 16-bit length */
                    if (i + 1 < n) {
                        uint32_t v = (rnd() & 1) ? 0xffff : (uint32_t)(rnd() % 0x4100);
                        buf[i] = (uint8_t)(v >> 8);
                        buf[i + 1] = (uint8_t)v;
                    }
                    break;
                }
            }
            check_one(buf, n, ninputs + runs, 0);
            runs++;
        }
    }
    fprintf(stderr, "parsers_fuzz: %llu mutated inputs\n", (unsigned long long)runs);
}

int main(int argc, char **argv)
{
    double seconds = 0;
    int i = 1, all_prefixes = 0;

    if (argc == 2 && strcmp(argv[1], "--selftest-overread") == 0) {
        volatile uint8_t *p = malloc(16);
        memset((void *)p, 0, 16);
        int v = p[16];          /* one past the end: ASan must stop here */
        free((void *)p);
        printf("read %d past the end unnoticed\n", v);
        return 0;
    }
    for (;;) {
        if (i + 1 < argc && strcmp(argv[i], "--mutate") == 0) {
            seconds = atof(argv[i + 1]);
            i += 2;
        } else if (i < argc && strcmp(argv[i], "--all-prefixes") == 0) {
            all_prefixes = 1;
            i++;
        } else {
            break;
        }
    }
    for (; i < argc; i++)
        if (read_pack(argv[i]) < 0)
            return 2;
    if (!ninputs) {
        fprintf(stderr, "usage: parsers_fuzz [--mutate SECONDS] PACK...\n");
        return 2;
    }
    for (size_t k = 0; k < ninputs; k++)
        check_one(inputs[k].p, inputs[k].n, k, all_prefixes);
    if (seconds > 0)
        mutate_for(seconds);
    fprintf(stderr, "parsers_fuzz: %zu inputs, %llu parses, all within the contract\n", ninputs,
            (unsigned long long)checked);
    return 0;
}

#endif
