;; foreign_napi.wat -- imitates a Node-API addon built with napi-rs for wasm32-wasip1-threads:
;; env.napi_* functions that only Node.js (@napi-rs/wasm-runtime) provides.
;; Expected: INVALID_MODULE at load, toolchain "napi-rs".
(module
  (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
  (import "env" "napi_create_string_utf8" (func (param i32 i32 i32 i32) (result i32)))
  (import "env" "napi_define_properties" (func (param i32 i32 i32 i32) (result i32)))
  (import "env" "napi_get_cb_info" (func (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "napi_module_register" (func (param i32)))
  (memory (export "memory") 17)
  (func (export "napi_register_wasm_v1") (param i32 i32) (result i32) (i32.const 0)))
