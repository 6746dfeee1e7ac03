//! upper_component: a wasm-core plugin in Rust as a WebAssembly component (wasm32-wasip2),
//! world `plugin-with-files` of wit/wasm-core.wit. The same behaviour as the Python and
//! JavaScript samples in plugins/components/:
//!
//! * the output is the input with ASCII letters upper-cased, followed by the value of the env
//!   variable `SUFFIX` when the request sets one; one log line `rust plugin: N bytes in`;
//! * input `fail`: `err("asked to fail")` (PLUGIN_ERROR); `trap`: a panic (TRAP, the panic
//!   message is logged); `loop`: never returns (TIMEOUT).
//!
//! `process` gets the input as a `list<u8>` value; `process-stream` reads it from stdin and
//! writes the output to stdout (WASI preview 2 streams through Rust's std); `process-file`
//! reads it from stdin in one `wasi:io` `blocking-read` and writes the output to the file the
//! host names in one `wasi:filesystem` `descriptor.write`: the fast path for large payloads.
//! With the env variable `OUTPUT_SYMLINK` set, `process-file` makes the output a symlink to
//! that path instead (what the host must refuse to follow: tests/test_component_file_entry.py).
//!
//! No wit-bindgen (no crates): the exports and the `host.log`, `wasi:io` and `wasi:filesystem` imports
//! are written against the component model's canonical ABI by hand, and the linker
//! (wasm-component-ld, given the WIT files with `--component-type`) wraps the core module
//! into the component.

use std::io::{Read, Write};

#[link(wasm_import_module = "wasm-core:plugin/host@0.1.0")]
extern "C" {
    /// `log: func(message: string)`: a string is passed as (pointer, length) of UTF-8.
    #[link_name = "log"]
    fn host_log(ptr: *const u8, len: usize);
}

fn log(line: &str) {
    unsafe { host_log(line.as_ptr(), line.len()) }
}

/// What both entries do with the input.
/// In place: a 1 MiB input is not copied again.
fn upper(mut input: Vec<u8>, env: &[(String, String)]) -> Result<Vec<u8>, String> {
    log(&format!("rust plugin: {} bytes in", input.len()));
    match input.as_slice() {
        b"fail" => return Err("asked to fail".to_string()),
        b"trap" => panic!("asked to trap"),
        b"loop" => {
            #[allow(clippy::empty_loop)]
            loop {}
        }
        _ => {}
    }
    make_ascii_uppercase(&mut input);
    if let Some((_, suffix)) = env.iter().find(|(key, _)| key == "SUFFIX") {
        input.extend_from_slice(suffix.as_bytes());
    }
    Ok(input)
}

/// `[u8]::make_ascii_uppercase`, eight bytes at a time: the byte-by-byte loop costs about
/// 2 ms per MiB under the service's fuel metering, more than moving the MiB in and out.
fn make_ascii_uppercase(bytes: &mut [u8]) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    // Safe: any bit pattern is a valid u64 and a valid u8.
    let (head, words, tail) = unsafe { bytes.align_to_mut::<u64>() };
    head.make_ascii_uppercase();
    tail.make_ascii_uppercase();
    for word in words {
        // Per byte, from its low seven bits (no carry between bytes): the top bit of
        // `from_a` is set when the byte is >= b'a', that of `past_z` when it is > b'z'; a
        // byte with its own top bit set is not ASCII and stays as it is.
        let low7 = *word & (0x7f * ONES);
        let from_a = low7 + (0x80 - u64::from(b'a')) * ONES;
        let past_z = low7 + (0x80 - u64::from(b'z') - 1) * ONES;
        let lower = from_a & !past_z & !*word & (0x80 * ONES);
        *word ^= lower >> 2; // clears 0x20 in the lower-case letters
    }
}

// ---------------------------------------------------------------- canonical ABI, by hand

/// A lowered `list<tuple<string, string>>` element: two (pointer, length) pairs.
#[repr(C)]
pub struct EnvPair {
    key_ptr: *mut u8,
    key_len: usize,
    value_ptr: *mut u8,
    value_len: usize,
}

/// Where an export's `result<list<u8>, string>` / `result<_, string>` is returned: it flattens
/// to three values, more than one, so the core function returns a pointer to this area:
/// discriminant (u8, 0 = ok, 1 = err) at 0, payload pointer at 4, length at 8.
#[repr(C, align(4))]
pub struct ReturnArea {
    discriminant: u8,
    ptr: *const u8,
    len: usize,
}

static mut RETURN_AREA: ReturnArea = ReturnArea { discriminant: 0, ptr: std::ptr::null(), len: 0 };

/// Takes ownership of a list the host lowered into memory it got from `cabi_realloc`.
/// A zero length may come with any pointer (often 1): no allocation to take over then.
unsafe fn take_list<T>(ptr: *mut T, len: usize) -> Vec<T> {
    if len == 0 { Vec::new() } else { Vec::from_raw_parts(ptr, len, len) }
}

unsafe fn take_env(ptr: *mut EnvPair, len: usize) -> Vec<(String, String)> {
    take_list(ptr, len)
        .into_iter()
        .map(|pair| {
            // The host lowers `string` as UTF-8, so no check is needed.
            let key = String::from_utf8_unchecked(take_list(pair.key_ptr, pair.key_len));
            let value = String::from_utf8_unchecked(take_list(pair.value_ptr, pair.value_len));
            (key, value)
        })
        .collect()
}

/// Fills the return area. The payload is leaked: the instance is thrown away after the call
/// (a `cabi_post_*` export could free it; nothing needs to).
fn lower_result(result: Result<Vec<u8>, String>) -> *const ReturnArea {
    let (discriminant, bytes) = match result {
        Ok(bytes) => (0, bytes),
        Err(message) => (1, message.into_bytes()),
    };
    let bytes = bytes.leak();
    unsafe {
        let area = &mut *std::ptr::addr_of_mut!(RETURN_AREA);
        *area = ReturnArea { discriminant, ptr: bytes.as_ptr(), len: bytes.len() };
        area
    }
}

/// Logs the panic message through `host.log`; with `panic = "abort"` the component then traps.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        match info.location() {
            Some(at) => log(&format!("rust plugin panicked at {}:{}: {message}", at.file(), at.line())),
            None => log(&format!("rust plugin panicked: {message}")),
        }
    }));
}

/// `process: func(input: list<u8>, env: list<tuple<string, string>>) -> result<list<u8>, string>`
#[export_name = "process"]
pub unsafe extern "C" fn process(input_ptr: *mut u8, input_len: usize,
                                 env_ptr: *mut EnvPair, env_len: usize) -> *const ReturnArea {
    log_panics();
    let input = take_list(input_ptr, input_len);
    let env = take_env(env_ptr, env_len);
    lower_result(upper(input, &env))
}

/// `process-stream: func(env: list<tuple<string, string>>) -> result<_, string>`
#[export_name = "process-stream"]
pub unsafe extern "C" fn process_stream(env_ptr: *mut EnvPair, env_len: usize) -> *const ReturnArea {
    log_panics();
    let env = take_env(env_ptr, env_len);
    let mut input = Vec::new();
    let result = match std::io::stdin().read_to_end(&mut input) {
        Ok(_) => upper(input, &env).and_then(|out| {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&out).and_then(|()| stdout.flush()).map_err(|e| format!("stdout: {e}"))
        }),
        Err(e) => Err(format!("stdin: {e}")),
    };
    lower_result(result.map(|()| Vec::new()))
}

// ---------------------------------------------------------------- process-file: WASI 0.2, by hand

/// The few WASI 0.2 functions `process-file` needs, lowered by hand (Rust's std would go
/// through the preview 1 adapter, which moves 4 KiB per call). Resources are i32 handles;
/// every result wider than one value is written to a return area.
mod fs {
    #[link(wasm_import_module = "wasi:cli/stdin@0.2.4")]
    extern "C" {
        /// `get-stdin: func() -> input-stream`
        #[link_name = "get-stdin"]
        fn get_stdin() -> i32;
    }

    #[link(wasm_import_module = "wasi:io/streams@0.2.4")]
    extern "C" {
        /// `blocking-read: func(len: u64) -> result<list<u8>, stream-error>`
        #[link_name = "[method]input-stream.blocking-read"]
        fn blocking_read(stream: i32, len: u64, ret: *mut ReadRet);
    }

    #[link(wasm_import_module = "wasi:filesystem/preopens@0.2.4")]
    extern "C" {
        /// `get-directories: func() -> list<tuple<descriptor, string>>`
        #[link_name = "get-directories"]
        fn get_directories(ret: *mut ListRet);
    }

    #[link(wasm_import_module = "wasi:filesystem/types@0.2.4")]
    extern "C" {
        /// `open-at: func(path-flags, path: string, open-flags, flags: descriptor-flags)
        /// -> result<descriptor, error-code>`
        #[link_name = "[method]descriptor.open-at"]
        fn open_at(dir: i32, path_flags: i32, path: *const u8, path_len: usize, open_flags: i32,
                   flags: i32, ret: *mut HandleRet);
        /// `write: func(buffer: list<u8>, offset: filesize) -> result<filesize, error-code>`
        #[link_name = "[method]descriptor.write"]
        fn write(file: i32, buf: *const u8, len: usize, offset: u64, ret: *mut WriteRet);
        /// `symlink-at: func(old-path: string, new-path: string) -> result<_, error-code>`
        #[link_name = "[method]descriptor.symlink-at"]
        fn symlink_at(dir: i32, old: *const u8, old_len: usize, new: *const u8, new_len: usize,
                      ret: *mut UnitRet);
    }

    #[repr(C)]
    struct ListRet { ptr: *mut Preopen, len: usize }
    #[repr(C)]
    struct Preopen { handle: i32, path_ptr: *mut u8, path_len: usize }
    #[repr(C)]
    struct HandleRet { discriminant: u8, value: i32 } // value: handle, or error code (u8)
    /// ok: the list; err: a stream-error, its case at 4 (0 last-operation-failed, 1 closed).
    #[repr(C)]
    struct ReadRet { discriminant: u8, ptr: *mut u8, len: usize }
    #[repr(C)]
    struct WriteRet { discriminant: u8, value: u64 } // value: bytes written, or error code
    #[repr(C)]
    struct UnitRet { discriminant: u8, code: u8 }

    const WRITE: i32 = 2; // descriptor-flags
    const CREATE: i32 = 1; // open-flags
    const TRUNCATE: i32 = 8;
    /// Asked of each `blocking-read`: wasmtime hands back at most what stdin has left.
    const READ_CHUNK: u64 = 16 << 20;

    /// The preopened directory holding `path` and the path relative to it.
    fn locate(path: &str) -> Result<(i32, String), String> {
        let mut ret = ListRet { ptr: std::ptr::null_mut(), len: 0 };
        let preopens = unsafe {
            get_directories(&mut ret);
            super::take_list(ret.ptr, ret.len)
        };
        for dir in preopens {
            let name = unsafe { String::from_utf8_unchecked(super::take_list(dir.path_ptr, dir.path_len)) };
            if let Some(rest) = path.strip_prefix(name.trim_end_matches('/')).and_then(|r| r.strip_prefix('/')) {
                return Ok((dir.handle, rest.to_string()));
            }
        }
        Err(format!("{path}: not in a preopened directory"))
    }

    fn open(path: &str, open_flags: i32, flags: i32) -> Result<i32, String> {
        let (dir, relative) = locate(path)?;
        let mut ret = HandleRet { discriminant: 0, value: 0 };
        unsafe { open_at(dir, 0, relative.as_ptr(), relative.len(), open_flags, flags, &mut ret) };
        match ret.discriminant {
            0 => Ok(ret.value),
            _ => Err(format!("{path}: open failed (wasi error-code {})", ret.value & 0xff)),
        }
    }

    /// All of stdin, in one `blocking-read` up to 16 MiB (a list the host lowers at once).
    pub fn read_stdin() -> Result<Vec<u8>, String> {
        let stdin = unsafe { get_stdin() };
        let mut data = Vec::new();
        loop {
            let mut ret = ReadRet { discriminant: 0, ptr: std::ptr::null_mut(), len: 0 };
            unsafe { blocking_read(stdin, READ_CHUNK, &mut ret) };
            if ret.discriminant != 0 {
                return match ret.ptr as usize & 0xff {
                    1 => Ok(data), // closed: the end of the input
                    _ => Err("stdin: read failed".to_string()),
                };
            }
            let chunk = unsafe { super::take_list(ret.ptr, ret.len) };
            if data.is_empty() { data = chunk } else { data.extend_from_slice(&chunk) }
        }
    }

    /// A new file at `path` holding `bytes`, in one `write` call when wasmtime takes it all.
    pub fn write_file(path: &str, bytes: &[u8]) -> Result<(), String> {
        let file = open(path, CREATE | TRUNCATE, WRITE)?;
        let mut done = 0;
        while done < bytes.len() {
            let mut ret = WriteRet { discriminant: 0, value: 0 };
            let rest = &bytes[done..];
            unsafe { write(file, rest.as_ptr(), rest.len(), done as u64, &mut ret) };
            if ret.discriminant != 0 {
                return Err(format!("{path}: write failed (wasi error-code {})", ret.value & 0xff));
            }
            done += ret.value as usize;
        }
        Ok(())
    }

    /// `path` becomes a symlink to `target` (what a guest may try to make the host read).
    pub fn symlink(target: &str, path: &str) -> Result<(), String> {
        let (dir, relative) = locate(path)?;
        let mut ret = UnitRet { discriminant: 0, code: 0 };
        unsafe { symlink_at(dir, target.as_ptr(), target.len(), relative.as_ptr(), relative.len(), &mut ret) };
        match ret.discriminant {
            0 => Ok(()),
            _ => Err(format!("symlink {path} -> {target} failed (wasi error-code {})", ret.code)),
        }
    }
}

/// `process-file: func(output-path: string, env: list<tuple<string, string>>) -> result<_, string>`
#[export_name = "process-file"]
pub unsafe extern "C" fn process_file(output_ptr: *mut u8, output_len: usize,
                                      env_ptr: *mut EnvPair, env_len: usize) -> *const ReturnArea {
    log_panics();
    let output_path = String::from_utf8_unchecked(take_list(output_ptr, output_len));
    let env = take_env(env_ptr, env_len);
    let result = match env.iter().find(|(key, _)| key == "OUTPUT_SYMLINK") {
        Some((_, target)) => fs::symlink(target, &output_path),
        None => fs::read_stdin()
            .and_then(|input| upper(input, &env))
            .and_then(|out| fs::write_file(&output_path, &out)),
    };
    lower_result(result.map(|()| Vec::new()))
}
