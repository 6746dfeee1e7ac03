/*
 * wasi_files.c -- wasm-core sample plugin (ABI kind 3: WASI preview 1 command) that needs
 * arguments and files: a small spell checker plus file commands, run in argument order.
 *
 *   wasi_files args                  print argv, one argument a line (argv[0] first); stop
 *   wasi_files check DICT            copy stdin to /tmp/check.txt, read it back, print each
 *                                    word not in DICT (one word a line, DICT: one word a
 *                                    line, e.g. a file of a read-only mapped directory)
 *   wasi_files put PATH N            write N bytes ('x') to PATH
 *   wasi_files get PATH              print PATH's contents
 *   wasi_files ls DIR                print DIR's entries, sorted, one a line
 *   wasi_files stack KIB             fill and sum a KIB KiB buffer on the C (shadow) stack:
 *                                    fine with build.sh's 1 MiB stack up to ~1000 KiB;
 *                                    with wasm-ld's default 64 KiB, `stack 512` fails with
 *                                    a memory fault far below address 0 (docs/plugin-abi.md)
 *
 * Commands may follow one another: `put /tmp/a 3 get /tmp/a ls /tmp`. Each one that fails
 * prints "wasi_files: CMD PATH: strerror" to stderr (the log) and exits with status 2 (a
 * usage error: 64). The last line on stderr is a summary "wasi_files: N commands".
 *
 * Build (see build.sh; the stack size is explained in docs/plugin-abi.md):
 *   clang --target=wasm32-wasi -O2 -Wl,-z,stack-size=1048576 -o ../wasi_files.wasm wasi_files.c
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void fail(const char *cmd, const char *path) {
    fprintf(stderr, "wasi_files: %s %s: %s\n", cmd, path, strerror(errno));
    exit(2);
}

static char *read_all(FILE *f, size_t *len) {
    size_t cap = 4096, n = 0, got;
    char *buf = malloc(cap + 1);
    if (!buf) return NULL;
    while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            char *bigger = realloc(buf, cap * 2 + 1);
            if (!bigger) { free(buf); return NULL; }
            buf = bigger;
            cap *= 2;
        }
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The dictionary's words, sorted, for bsearch. */
static char **dict_words;
static size_t dict_count;

static void load_dict(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) fail("check", path);
    size_t len;
    char *text = read_all(f, &len);
    fclose(f);
    if (!text) fail("check", path);
    size_t cap = 256;
    dict_words = malloc(cap * sizeof *dict_words);
    for (char *line = strtok(text, "\r\n"); line; line = strtok(NULL, "\r\n")) {
        if (dict_count == cap) dict_words = realloc(dict_words, (cap *= 2) * sizeof *dict_words);
        for (char *c = line; *c; c++) *c = (char)tolower((unsigned char)*c);
        dict_words[dict_count++] = line;
    }
    qsort(dict_words, dict_count, sizeof *dict_words, cmp_str);
}

static void check(const char *dict) {
    load_dict(dict);
    /* Through a scratch file, as a tool that spools its input would. */
    size_t len;
    char *input = read_all(stdin, &len);
    FILE *spool = fopen("/tmp/check.txt", "w");
    if (!spool) fail("check", "/tmp/check.txt");
    if (fwrite(input, 1, len, spool) != len || fclose(spool) != 0) fail("check", "/tmp/check.txt");
    free(input);
    spool = fopen("/tmp/check.txt", "r");
    if (!spool) fail("check", "/tmp/check.txt");
    char *text = read_all(spool, &len);
    fclose(spool);
    size_t words = 0, unknown = 0;
    char *p = text;
    while (*p) {
        while (*p && !isalpha((unsigned char)*p)) p++;
        char *start = p;
        while (*p && (isalpha((unsigned char)*p) || *p == '\'')) {
            *p = (char)tolower((unsigned char)*p);
            p++;
        }
        if (p == start) break;
        char saved = *p;
        *p = '\0';
        words++;
        if (!bsearch(&start, dict_words, dict_count, sizeof *dict_words, cmp_str)) {
            printf("%s\n", start);
            unknown++;
        }
        *p = saved;
    }
    fprintf(stderr, "wasi_files: %zu words, %zu unknown\n", words, unknown);
}

static void put(const char *path, const char *count) {
    long n = atol(count);
    FILE *f = fopen(path, "w");
    if (!f) fail("put", path);
    char chunk[4096];
    memset(chunk, 'x', sizeof chunk);
    while (n > 0) {
        size_t step = n < (long)sizeof chunk ? (size_t)n : sizeof chunk;
        if (fwrite(chunk, 1, step, f) != step) fail("put", path);
        n -= (long)step;
    }
    if (fclose(f) != 0) fail("put", path);
}

static void get(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) fail("get", path);
    size_t len;
    char *text = read_all(f, &len);
    fclose(f);
    fwrite(text, 1, len, stdout);
    free(text);
}

static void ls(const char *path) {
    DIR *dir = opendir(path);
    if (!dir) fail("ls", path);
    char *names[1024];
    size_t n = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) && n < 1024) {
        if (strcmp(entry->d_name, ".") && strcmp(entry->d_name, ".."))
            names[n++] = strdup(entry->d_name);
    }
    closedir(dir);
    qsort(names, n, sizeof *names, cmp_str);
    for (size_t i = 0; i < n; i++) printf("%s\n", names[i]);
}

static void stack(const char *kib) {
    size_t n = (size_t)atol(kib) * 1024;
    volatile unsigned char *buf = __builtin_alloca(n);  /* on the shadow stack */
    unsigned sum = 0;
    for (size_t i = 0; i < n; i++) buf[i] = (unsigned char)(i * 31);
    for (size_t i = 0; i < n; i++) sum += buf[i];
    printf("stack %s KiB: sum %u\n", kib, sum);
}

int main(int argc, char **argv) {
    int i = 1, done = 0;
    while (i < argc) {
        const char *cmd = argv[i];
        int needs = !strcmp(cmd, "put") ? 2 : !strcmp(cmd, "args") ? 0 : 1;
        if (i + needs >= argc + (needs == 0)) {
            fprintf(stderr, "wasi_files: usage: args | check DICT | put PATH N | get PATH | ls DIR | "
                            "stack KIB\n");
            return 64;
        }
        if (!strcmp(cmd, "args")) {
            for (int k = 0; k < argc; k++) printf("%s\n", argv[k]);
            done++;
            break;
        } else if (!strcmp(cmd, "check")) {
            check(argv[i + 1]);
        } else if (!strcmp(cmd, "put")) {
            put(argv[i + 1], argv[i + 2]);
        } else if (!strcmp(cmd, "get")) {
            get(argv[i + 1]);
        } else if (!strcmp(cmd, "ls")) {
            ls(argv[i + 1]);
        } else if (!strcmp(cmd, "stack")) {
            stack(argv[i + 1]);
        } else {
            fprintf(stderr, "wasi_files: unknown command %s\n", cmd);
            return 64;
        }
        i += 1 + needs;
        done++;
    }
    fprintf(stderr, "wasi_files: %d commands\n", done);
    return 0;
}
