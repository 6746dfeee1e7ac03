;; call_method.wat -- calls a host method: input "NAME\nREQUEST-JSON" (a method name, a
;; newline, its JSON request). Outputs the method's JSON response and logs "ok", or outputs
;; the JSON error and logs "error": the call's failure is the plugin's to handle, so it
;; returns 0 either way. No newline in the input: returns 2.
(module
  (import "host" "call"        (func $call        (param i32 i32 i32 i32) (result i64)))
  (import "host" "call_result" (func $call_result (param i32 i32) (result i32)))
  (import "host" "output"      (func $output      (param i32 i32)))
  (import "host" "log"         (func $log         (param i32 i32)))

  (memory (export "memory") 1)
  (data (i32.const 0) "ok")
  (data (i32.const 8) "error")

  ;; bump allocator from 1024; grows memory on demand, traps when it cannot
  (global $heap (mut i32) (i32.const 1024))
  (func $alloc (export "alloc") (param $len i32) (result i32)
    (local $ptr i32) (local $end i32)
    (local.set $ptr (global.get $heap))
    (local.set $end (i32.add (local.get $ptr) (local.get $len)))
    (if (i32.gt_u (local.get $end) (i32.shl (memory.size) (i32.const 16)))
      (then
        (if (i32.eq (memory.grow
                      (i32.sub (i32.shr_u (i32.add (local.get $end) (i32.const 65535))
                                          (i32.const 16))
                               (memory.size)))
                    (i32.const -1))
          (then unreachable))))
    (global.set $heap (local.get $end))
    (local.get $ptr))

  (func (export "process")
        (param $in i32) (param $in_len i32) (param $env i32) (param $env_len i32)
        (result i32)
    (local $nl i32) (local $result i64) (local $len i32) (local $buf i32)
    ;; find the newline that ends the method's name
    (local.set $nl (i32.const 0))
    (block $found
      (loop $scan
        (br_if $found (i32.ge_u (local.get $nl) (local.get $in_len)))
        (br_if $found (i32.eq (i32.load8_u (i32.add (local.get $in) (local.get $nl)))
                              (i32.const 10)))
        (local.set $nl (i32.add (local.get $nl) (i32.const 1)))
        (br $scan)))
    (if (i32.ge_u (local.get $nl) (local.get $in_len)) (then (return (i32.const 2))))

    ;; host.call(name, request) -> length of the response (>= 0) or -length of the error
    (local.set $result
      (call $call (local.get $in) (local.get $nl)
                  (i32.add (local.get $in) (i32.add (local.get $nl) (i32.const 1)))
                  (i32.sub (local.get $in_len) (i32.add (local.get $nl) (i32.const 1)))))
    (local.set $len
      (i32.wrap_i64
        (select (i64.sub (i64.const 0) (local.get $result)) (local.get $result)
                (i64.lt_s (local.get $result) (i64.const 0)))))

    ;; read it: host.call_result(buffer, length) copies the bytes
    (local.set $buf (call $alloc (local.get $len)))
    (drop (call $call_result (local.get $buf) (local.get $len)))
    (call $output (local.get $buf) (local.get $len))
    (if (i64.lt_s (local.get $result) (i64.const 0))
      (then (call $log (i32.const 8) (i32.const 5)))
      (else (call $log (i32.const 0) (i32.const 2))))
    (i32.const 0))
)
