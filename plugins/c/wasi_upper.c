/*
 * wasi_upper.c -- wasm-core sample plugin (ABI kind 3: WASI preview 1 command).
 *
 * Reads all of stdin, writes it to stdout with ASCII a-z uppercased, writes
 * one line "wasi_upper: N bytes" to stderr (the log). If the environment
 * variable FAIL_WITH is set, exits with that status (atoi; e.g. FAIL_WITH=3
 * gives PLUGIN_ERROR code 3) after writing the output; otherwise exits 0.
 *
 * Build (see build.sh):
 *   clang --target=wasm32-wasi -O2 -o ../wasi_upper.wasm wasi_upper.c
 */
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    if (!buf) return 1;
    for (;;) {
        if (len == cap) {
            cap *= 2;
            char *nb = realloc(buf, cap);
            if (!nb) return 1;
            buf = nb;
        }
        size_t n = fread(buf + len, 1, cap - len, stdin);
        if (n == 0) break;
        len += n;
    }
    for (size_t i = 0; i < len; i++)
        if (buf[i] >= 'a' && buf[i] <= 'z') buf[i] = (char)(buf[i] - 32);
    fwrite(buf, 1, len, stdout);
    fflush(stdout);
    fprintf(stderr, "wasi_upper: %zu bytes\n", len);

    const char *fail = getenv("FAIL_WITH");
    if (fail) return atoi(fail);
    return 0;
}
