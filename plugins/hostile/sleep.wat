;; A WASI command whose host call blocks: poll_oneoff on a 60 s relative clock.
;; Epoch interruption cannot stop a thread inside the host, so only the supervisor's
;; deadline (timeout + grace, then SIGKILL) ends it.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    ;; subscription at 0: userdata(u64)=0, tag(u8)=0 clock at 8,
    ;; clock id(u32)=1 monotonic at 16, timeout(u64) at 24, precision(u64) at 32, flags(u16)=0 at 40
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 60000000000))
    (i64.store (i32.const 32) (i64.const 0))
    (i32.store16 (i32.const 40) (i32.const 0))
    (drop (call $poll_oneoff (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))
