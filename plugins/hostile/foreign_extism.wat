;; foreign_extism.wat -- imitates a plugin built for an Extism embedder whose host function
;; `extism:host/user.lookup` takes i32s: wasm-core serves user functions as host methods of
;; the same name, which take and return one block offset, (i64) -> i64.
;; Expected: INVALID_MODULE at load, toolchain "extism", the import named.
(module
  (import "extism:host/env" "input_length" (func (result i64)))
  (import "extism:host/env" "input_load_u8" (func (param i64) (result i32)))
  (import "extism:host/env" "alloc" (func (param i64) (result i64)))
  (import "extism:host/env" "output_set" (func (param i64 i64)))
  (import "extism:host/user" "lookup" (func (param i32) (result i32)))
  (func (export "run") (result i32) (i32.const 0)))
