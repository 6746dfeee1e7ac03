/* wasi_words.c -- an Extism plugin that uses WASI through wasi-libc (a reactor: `_initialize`
 * runs before the entry), built with wasmcore-extism.h (see ../build.sh).
 *
 *   words:  output "<n> words" for the input (malloc'd copy, snprintf); writes one line to
 *           stderr, which wasm-core keeps in the execution's logs.
 */
#include <stdio.h>
#include <stdlib.h>

#include "wasmcore-extism.h"

EXTISM_EXPORT("words") int32_t words(void) {
  uint64_t n = extism_input_length();
  char *text = malloc(n + 1);
  if (!text) return 2;
  extism_input(text, n);
  unsigned count = 0;
  int in_word = 0;
  for (uint64_t i = 0; i < n; i++) {
    int space = text[i] == ' ' || text[i] == '\n' || text[i] == '\t';
    if (!space && !in_word) count++;
    in_word = !space;
  }
  free(text);
  char out[32];
  int len = snprintf(out, sizeof out, "%u words", count);
  fprintf(stderr, "words: counted %llu bytes\n", (unsigned long long)n);
  extism_output(out, (uint64_t)len);
  return 0;
}
