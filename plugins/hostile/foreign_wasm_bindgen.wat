;; foreign_wasm_bindgen.wat -- imitates a Rust crate built with wasm-bindgen for a JavaScript
;; host (wasm32-unknown-unknown + wasm-bindgen): the same import module and names.
;; Expected: INVALID_MODULE at load, toolchain "wasm-bindgen".
(module
  (import "wbg" "__wbg_log_1d3ae0913e6ef9b6" (func (param i32 i32)))
  (import "wbg" "__wbindgen_object_drop_ref" (func (param i32)))
  (import "wbg" "__wbindgen_string_new" (func (param i32 i32) (result i32)))
  (import "wbg" "__wbindgen_throw" (func (param i32 i32)))
  (memory (export "memory") 17)
  (func (export "greet") (param i32 i32))
  (func (export "__wbindgen_malloc") (param i32 i32) (result i32) (i32.const 1024)))
