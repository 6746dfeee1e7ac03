/*
 * wordfreq.c -- wasm-core sample plugin in C (ABI kind 1: core module).
 *
 * process(input, env): counts word frequencies in the input and outputs the
 * 10 most frequent words, one "word count\n" line each, sorted by count
 * (descending) then by word (ascending, bytewise). Fewer lines if the input
 * has fewer distinct words; empty output for an input without words.
 *
 * A word is a maximal run of ASCII letters, ASCII digits, apostrophes and
 * bytes >= 0x80 (so UTF-8 words stay whole); everything else separates words.
 * ASCII letters are lowercased first, so "The" and "the" are the same word.
 * Always returns 0 (alloc traps if memory cannot grow).
 *
 * No libc, no WASI: the only imports are host.output (and host.log).
 * Build (see build.sh):
 *   clang --target=wasm32-unknown-unknown -O2 -nostdlib -mbulk-memory \
 *     -Wl,--no-entry -Wl,--export=alloc -Wl,--export=process \
 *     -o ../wordfreq.wasm wordfreq.c
 */
#include <stddef.h>
#include <stdint.h>

#define IMPORT(mod, name) __attribute__((import_module(mod), import_name(name)))
#define EXPORT(name) __attribute__((export_name(name)))

IMPORT("host", "output") void host_output(const void *ptr, uint32_t len);
IMPORT("host", "log") void host_log(const void *ptr, uint32_t len);

/* ---- bump allocator over linear memory, starting at __heap_base ---- */
extern unsigned char __heap_base;
static uintptr_t heap_top = 0;

EXPORT("alloc") void *alloc(uint32_t len) {
    if (heap_top == 0) heap_top = (uintptr_t)&__heap_base;
    uintptr_t ptr = (heap_top + 7u) & ~(uintptr_t)7u;
    uint64_t end = (uint64_t)ptr + len;
    uint64_t have = (uint64_t)__builtin_wasm_memory_size(0) << 16;
    if (end > have) {
        uint64_t pages = ((end - have) + 65535u) >> 16;
        if (__builtin_wasm_memory_grow(0, (uintptr_t)pages) == (size_t)-1)
            __builtin_trap();
    }
    heap_top = (uintptr_t)end;
    return (void *)ptr;
}

/* ---- hash table of words ---- */
typedef struct {
    const unsigned char *word; /* points into the (lowercased) input */
    uint32_t len;
    uint32_t count;
    uint32_t hash;             /* 0 = empty slot */
} entry;

static entry *table;
static uint32_t cap, used;

static uint32_t hash_bytes(const unsigned char *p, uint32_t n) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (uint32_t i = 0; i < n; i++) { h ^= p[i]; h *= 16777619u; }
    return h ? h : 1;
}

static int bytes_eq(const unsigned char *a, const unsigned char *b, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) if (a[i] != b[i]) return 0;
    return 1;
}

static entry *new_table(uint32_t n) {
    entry *t = alloc(n * (uint32_t)sizeof(entry));
    for (uint32_t i = 0; i < n; i++) t[i].hash = 0; /* mark all slots empty */
    return t;
}

static void insert(const unsigned char *w, uint32_t len, uint32_t h, uint32_t count) {
    uint32_t i = h & (cap - 1);
    for (;;) {
        entry *e = &table[i];
        if (e->hash == 0) {
            e->word = w; e->len = len; e->count = count; e->hash = h;
            used++;
            return;
        }
        if (e->hash == h && e->len == len && bytes_eq(e->word, w, len)) {
            e->count += count;
            return;
        }
        i = (i + 1) & (cap - 1);
    }
}

static void add_word(const unsigned char *w, uint32_t len) {
    if ((used + 1) * 2 > cap) { /* keep load factor <= 1/2 */
        entry *old = table;
        uint32_t old_cap = cap;
        cap *= 2;
        table = new_table(cap);
        used = 0;
        for (uint32_t i = 0; i < old_cap; i++)
            if (old[i].hash) insert(old[i].word, old[i].len, old[i].hash, old[i].count);
    }
    insert(w, len, hash_bytes(w, len), 1);
}

/* does a rank before b? count desc, then word asc (bytewise, shorter first on tie) */
static int before(const entry *a, const entry *b) {
    if (a->count != b->count) return a->count > b->count;
    uint32_t n = a->len < b->len ? a->len : b->len;
    for (uint32_t i = 0; i < n; i++)
        if (a->word[i] != b->word[i]) return a->word[i] < b->word[i];
    return a->len < b->len;
}

static int is_word_byte(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '\'' || c >= 0x80;
}

static unsigned char *put_u32(unsigned char *dst, uint32_t n) {
    unsigned char tmp[10];
    int k = 0;
    do { tmp[k++] = (unsigned char)('0' + n % 10); n /= 10; } while (n);
    while (k) *dst++ = tmp[--k];
    return dst;
}

#define TOP 10

EXPORT("process")
int32_t process(unsigned char *in, uint32_t in_len, const unsigned char *env, uint32_t env_len) {
    (void)env; (void)env_len;
    cap = 64; used = 0;
    table = new_table(cap);

    /* lowercase ASCII in place, then split into words */
    for (uint32_t i = 0; i < in_len; i++)
        if (in[i] >= 'A' && in[i] <= 'Z') in[i] = (unsigned char)(in[i] + 32);
    uint32_t i = 0;
    while (i < in_len) {
        while (i < in_len && !is_word_byte(in[i])) i++;
        uint32_t start = i;
        while (i < in_len && is_word_byte(in[i])) i++;
        if (i > start) add_word(in + start, i - start);
    }

    /* keep the TOP best entries with an insertion sort */
    const entry *best[TOP];
    uint32_t nbest = 0;
    for (uint32_t k = 0; k < cap; k++) {
        const entry *e = &table[k];
        if (!e->hash) continue;
        if (nbest == TOP && !before(e, best[TOP - 1])) continue;
        uint32_t pos = nbest < TOP ? nbest++ : TOP - 1;
        while (pos > 0 && before(e, best[pos - 1])) { best[pos] = best[pos - 1]; pos--; }
        best[pos] = e;
    }

    /* format into one buffer, one host.output call */
    uint32_t size = 0;
    for (uint32_t k = 0; k < nbest; k++) size += best[k]->len + 12;
    unsigned char *buf = alloc(size ? size : 1), *p = buf;
    for (uint32_t k = 0; k < nbest; k++) {
        for (uint32_t j = 0; j < best[k]->len; j++) *p++ = best[k]->word[j];
        *p++ = ' ';
        p = put_u32(p, best[k]->count);
        *p++ = '\n';
    }
    if (p != buf) host_output(buf, (uint32_t)(p - buf));
    return 0;
}
