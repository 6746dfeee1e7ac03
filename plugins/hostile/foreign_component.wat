;; foreign_component.wat -- a WebAssembly component (component-model preamble: version 0x0d,
;; layer 1), as wasm32-wasip2 toolchains and `wasm-tools component new` produce, wrapping a
;; core module. Expected: INVALID_MODULE at load, toolchain "component", unless the server
;; runs components.
(component
  (core module $m
    (func (export "run") (result i32) (i32.const 0))))
