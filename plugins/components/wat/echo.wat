;; The smallest wasm-core plugin component: `process` returns its input unchanged.
;; Written by hand (canonical ABI), so what it measures is the service's cost of moving
;; bytes in and out of a component (bench/bench_components.py), not a language runtime's.
(component
  (core module $m
    (memory (export "memory") 1)
    (global $bump (mut i32) (i32.const 1024))
    ;; cabi_realloc(old_ptr, old_size, align, new_size) -> ptr: a bump allocator that grows
    ;; memory as needed (traps when it cannot)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (local.set $p (i32.and (i32.add (global.get $bump) (i32.const 7)) (i32.const -8)))
      (global.set $bump (i32.add (local.get $p) (local.get 3)))
      (block $done
        (loop $grow
          (br_if $done (i32.le_u (global.get $bump)
                                 (i32.mul (memory.size) (i32.const 65536))))
          (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1)) (then unreachable))
          (br $grow)))
      (local.get $p))
    ;; process(input_ptr, input_len, env_ptr, env_len) -> pointer to result<list<u8>, string>
    (func (export "process") (param i32 i32 i32 i32) (result i32)
      (i32.store8 (i32.const 0) (i32.const 0))  ;; ok
      (i32.store (i32.const 4) (local.get 0))
      (i32.store (i32.const 8) (local.get 1))
      (i32.const 0)))
  (core instance $i (instantiate $m))
  (func (export "process")
    (param "input" (list u8)) (param "env" (list (tuple string string)))
    (result (result (list u8) (error string)))
    (canon lift (core func $i "process") (memory (core memory $i "memory"))
      (realloc (core func $i "realloc")))))
