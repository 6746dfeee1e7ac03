//! upper_component: a wasm-core plugin in Rust as a WebAssembly component (wasm32-wasip2),
//! world `plugin-with-stream` of wit/wasm-core.wit. The same behaviour as the Python and
//! JavaScript samples in plugins/components/:
//!
//! * the output is the input with ASCII letters upper-cased, followed by the value of the env
//!   variable `SUFFIX` when the request sets one; one log line `rust plugin: N bytes in`;
//! * input `fail`: `err("asked to fail")` (PLUGIN_ERROR); `trap`: a panic (TRAP, the panic
//!   message is logged); `loop`: never returns (TIMEOUT).
//!
//! `process` gets the input as a `list<u8>` value; `process-stream` reads it from stdin and
//! writes the output to stdout (WASI preview 2 streams through Rust's std).
//!
//! No wit-bindgen (no crates): the two exports and the `host.log` import are written against
//! the component model's canonical ABI by hand, and the linker (wasm-component-ld, given the
//! WIT file with `--component-type`) wraps the core module into the component.

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
fn upper(input: &[u8], env: &[(String, String)]) -> Result<Vec<u8>, String> {
    log(&format!("rust plugin: {} bytes in", input.len()));
    match input {
        b"fail" => return Err("asked to fail".to_string()),
        b"trap" => panic!("asked to trap"),
        b"loop" => {
            #[allow(clippy::empty_loop)]
            loop {}
        }
        _ => {}
    }
    let mut out = input.to_ascii_uppercase();
    if let Some((_, suffix)) = env.iter().find(|(key, _)| key == "SUFFIX") {
        out.extend_from_slice(suffix.as_bytes());
    }
    Ok(out)
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
    lower_result(upper(&input, &env))
}

/// `process-stream: func(env: list<tuple<string, string>>) -> result<_, string>`
#[export_name = "process-stream"]
pub unsafe extern "C" fn process_stream(env_ptr: *mut EnvPair, env_len: usize) -> *const ReturnArea {
    log_panics();
    let env = take_env(env_ptr, env_len);
    let mut input = Vec::new();
    let result = match std::io::stdin().read_to_end(&mut input) {
        Ok(_) => upper(&input, &env).and_then(|out| {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&out).and_then(|()| stdout.flush()).map_err(|e| format!("stdout: {e}"))
        }),
        Err(e) => Err(format!("stdin: {e}")),
    };
    lower_result(result.map(|()| Vec::new()))
}
