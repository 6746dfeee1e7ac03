;; foreign_component.wat -- a WebAssembly component (component-model preamble: version 0x0d,
;; layer 1), as wasm32-wasip2 toolchains and `wasm-tools component new` produce, wrapping a
;; core module but exporting neither entry of wit/wasm-core.wit. Expected: INVALID_MODULE at
;; load, naming the entries a wasm-core component exports.
(component
  (core module $m
    (func (export "run") (result i32) (i32.const 0))))
