;; fallback.wat -- no-argument entries for the per-binary `entry_fallback` option:
;; `primary` traps, `secondary` returns 3 (PLUGIN_ERROR), `backup` outputs "backup".
(module
  (import "host" "output" (func $output (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "backup")
  (func (export "primary") unreachable)
  (func (export "secondary") (result i32) (i32.const 3))
  (func (export "backup") (call $output (i32.const 0) (i32.const 6)))
)
