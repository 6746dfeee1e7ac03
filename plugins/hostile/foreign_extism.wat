;; foreign_extism.wat -- imitates a plugin built with an Extism PDK: kernel functions from
;; extism:host/env and a host function of its embedder from extism:host/user (which no
;; server can know).
;; Expected: INVALID_MODULE at load, toolchain "extism" (whatever Extism support the server
;; has, extism:host/user.lookup stays missing).
(module
  (import "extism:host/env" "input_length" (func (result i64)))
  (import "extism:host/env" "input_load_u8" (func (param i64) (result i32)))
  (import "extism:host/env" "alloc" (func (param i64) (result i64)))
  (import "extism:host/env" "output_set" (func (param i64 i64)))
  (import "extism:host/user" "lookup" (func (param i64) (result i64)))
  (func (export "run") (result i32) (i32.const 0)))
