;; foreign_gojs.wat -- imitates a Go program built with GOOS=js GOARCH=wasm (Go 1.21+): its
;; imports come from the module "gojs" and need wasm_exec.js.
;; Expected: INVALID_MODULE at load, toolchain "go-js".
(module
  (import "gojs" "runtime.wasmExit" (func (param i32)))
  (import "gojs" "runtime.wasmWrite" (func (param i32)))
  (import "gojs" "runtime.resetMemoryDataView" (func (param i32)))
  (import "gojs" "runtime.nanotime1" (func (param i32)))
  (import "gojs" "syscall/js.valueGet" (func (param i32)))
  (import "gojs" "syscall/js.valueCall" (func (param i32)))
  (memory (export "mem") 16)
  (func (export "run") (param i32 i32))
  (func (export "resume")))
