/* malloc_fail.c -- a real C plugin (wasi-libc's malloc) that allocates 1 MiB blocks, touching
 * each, until malloc fails, and then calls __builtin_trap(), as C code that does not expect
 * to run out of memory does. With `size` bytes of input it instead makes one allocation of
 * that many MiB (one large allocation refused by the limit).
 * Expected under --memory 16: MEMORY_LIMIT with the requested and allowed sizes in details. */
#include <stdlib.h>
#include <string.h>

/* Every block is kept (chained through its first bytes), so the allocations cannot be
 * optimised away. */
static void *volatile kept;

__attribute__((export_name("alloc"))) void *alloc(int len) { return malloc(len ? len : 1); }

__attribute__((export_name("process"))) int process(const char *in, int in_len, const char *env,
                                                    int env_len) {
    (void)in; (void)env; (void)env_len;
    size_t block = 1 << 20;
    if (in_len > 1) block = (size_t)in_len << 20;   /* one large allocation of in_len MiB */
    for (;;) {
        char *p = malloc(block);
        if (!p) __builtin_trap();
        memset(p, 1, block);
        *(void **)p = kept;
        kept = p;
        if (in_len > 1) return 0;
    }
}
