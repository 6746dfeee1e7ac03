;; foreign_emscripten.wat -- imitates C/C++ built with emscripten for its JavaScript runtime:
;; env.emscripten_* helpers and env.invoke_* trampolines (C++ exceptions, setjmp) next to
;; WASI functions the service does provide.
;; Expected: INVALID_MODULE at load, toolchain "emscripten".
(module
  (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
  (import "env" "emscripten_memcpy_js" (func (param i32 i32 i32)))
  (import "env" "emscripten_resize_heap" (func (param i32) (result i32)))
  (import "env" "invoke_vii" (func (param i32 i32 i32)))
  (import "env" "invoke_iii" (func (param i32 i32 i32) (result i32)))
  (import "env" "__cxa_throw" (func (param i32 i32 i32)))
  (memory (export "memory") 256)
  (func (export "_start")))
