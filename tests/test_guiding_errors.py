"""Errors that guide, and docs/protocol.md as a client written from it alone reads it: every
case goes through the real server over raw DEALER sockets (or the real command line)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from bench.wasm_gen import big_module
from tests.conftest import HOSTILE, PLUGINS, exchange, raw_dealer
from wasmcore.protocol import messages as p
from wasmcore.sandbox_worker.import_hints import binary_hint, toolchain_hint

DOCS = Path(__file__).resolve().parent.parent / "docs"
pack = msgspec.msgpack.encode


def _load(sock, request_id: int, data: bytes, name: str):
    return exchange(sock, [pack({"type": "load", "id": request_id, "name": name}), data],
                    timeout_ms=60_000)


def _loaded_id(sock, path: Path) -> str:
    reply = _load(sock, 1, path.read_bytes(), path.stem)
    assert isinstance(reply, p.Loaded), reply
    return reply.binary_id


# ---------------------------------------------------------------- foreign toolchains


@pytest.mark.parametrize(
    ("plugin", "toolchain", "says"),
    [
        ("foreign_wasm_bindgen.wasm", "wasm-bindgen", ["wasm-bindgen", "wasm32-wasip1"]),
        ("foreign_gojs.wasm", "go-js", ["GOOS=js", "GOOS=wasip1"]),
        ("foreign_emscripten.wasm", "emscripten", ["emscripten", "STANDALONE_WASM"]),
        ("foreign_napi.wasm", "napi-rs", ["napi-rs", "Node"]),
        ("foreign_extism.wasm", "extism", ["Extism", "extism:host/user.lookup"]),
    ],
)
def test_a_foreign_toolchain_is_named_with_what_to_build_instead(service, plugin, toolchain,
                                                                 says):
    with raw_dealer(service.endpoint) as sock:
        reply = _load(sock, 7, (HOSTILE / plugin).read_bytes(), plugin)
    assert isinstance(reply, p.ErrorReply) and reply.code == "INVALID_MODULE", reply
    assert reply.id == 7
    assert reply.details["toolchain"] == toolchain
    for words in says:
        assert words in reply.message, (words, reply.message)


def test_a_component_outside_the_plugin_world_is_told_the_world(service):
    """Components load as their own kind now; one exporting neither entry of
    wit/wasm-core.wit is told which functions to export."""
    with raw_dealer(service.endpoint) as sock:
        reply = _load(sock, 9, (HOSTILE / "foreign_component.wasm").read_bytes(), "component")
    assert isinstance(reply, p.ErrorReply) and reply.code == "INVALID_MODULE", reply
    for words in ("component exports no entry function", "process-stream", "wit/wasm-core.wit"):
        assert words in reply.message, (words, reply.message)


def test_an_unrecognised_import_gets_no_toolchain(service):
    with raw_dealer(service.endpoint) as sock:
        reply = _load(sock, 8, (HOSTILE / "unknown_import.wasm").read_bytes(), "unknown")
    assert isinstance(reply, p.ErrorReply) and reply.code == "INVALID_MODULE", reply
    assert "toolchain" not in reply.details
    assert reply.details["missing_imports"] == ["env.mystery", "host.nope"]
    assert reply.details["missing_count"] == 2


def test_a_long_list_of_missing_imports_is_summarised(service):
    imports = [("wbg", f"__wbg_method_{i:04d}_{'f' * 16}") for i in range(1000)]
    with raw_dealer(service.endpoint) as sock:
        reply = _load(sock, 9, big_module(1000, imports=imports), "many")
    assert isinstance(reply, p.ErrorReply) and reply.code == "INVALID_MODULE", reply
    assert reply.details["missing_count"] == 1000
    assert reply.details["missing_imports"][0] == f"wbg.{imports[0][1]}"
    assert len(reply.details["missing_imports"]) <= 20
    assert "1000" in reply.message and "wasm-bindgen" in reply.message
    assert len(reply.message) < 800, reply.message
    assert len(pack(reply.details)) < 2000


# ---------------------------------------------------------------- 1. stray payload frames


@pytest.mark.parametrize("kind", ["list", "hello", "stats", "unload"])
@pytest.mark.parametrize("stray", [b"x", b""])
def test_a_stray_payload_frame_is_refused(service, kind, stray):
    with raw_dealer(service.endpoint) as sock:
        upper = _loaded_id(sock, PLUGINS / "uppercase.wat")
        header = {"type": kind, "id": 5}
        if kind == "unload":
            header["binary_id"] = upper
        reply = exchange(sock, [pack(header), stray])
        assert isinstance(reply, p.ErrorReply) and reply.code == "BAD_REQUEST", reply
        assert reply.id == 5 and "payload" in reply.message
        # Nothing ran: the binary is still there.
        listed = exchange(sock, [pack({"type": "list", "id": 6})])
        assert upper in {b.binary_id for b in listed.binaries}


def test_a_payload_frame_next_to_input_shm_is_refused(service):
    with raw_dealer(service.endpoint) as sock:
        upper = _loaded_id(sock, PLUGINS / "uppercase.wat")
        name = "wc-1-" + "0" * 32
        reply = exchange(sock, [pack({"type": "execute", "id": 4, "binary_id": upper,
                                      "input_shm": [name, 3]}), b"abc"])
        assert isinstance(reply, p.ErrorReply) and reply.code == "BAD_REQUEST", reply
        assert "input_shm" in reply.message and "payload" in reply.message


# ---------------------------------------------------------------- 2. no-argument entries


@pytest.mark.parametrize(("payload", "env"), [([b"data"], {}), ([], {"A": "1"}),
                                              ([b"data"], {"A": "1"})])
def test_input_or_env_to_a_no_argument_entry_is_refused(service, payload, env):
    with raw_dealer(service.endpoint) as sock:
        multi = _loaded_id(sock, PLUGINS / "multi_entry.wat")
        header = {"type": "execute", "id": 3, "binary_id": multi, "entry": "hello"}
        if env:
            header["env"] = env
        reply = exchange(sock, [pack(header), *payload])
        assert isinstance(reply, p.ErrorReply) and reply.code == "BAD_REQUEST", reply
        assert "hello" in reply.message and "no argument" in reply.message
        assert reply.details["entry"] == "hello"
        assert reply.details["available"] == ["process"]
        # Without them it runs; an empty input frame is no input.
        for frames in ([], [b""]):
            done = exchange(sock, [pack({"type": "execute", "id": 4, "binary_id": multi,
                                         "entry": "hello"}), *frames])
            assert isinstance(done, p.Executed), done


def test_a_wasi_command_still_gets_input_and_env(service):
    with raw_dealer(service.endpoint) as sock:
        upper = _loaded_id(sock, PLUGINS / "wasi_upper.wasm")
        sock.send_multipart([pack({"type": "execute", "id": 2, "binary_id": upper,
                                   "env": {"A": "1"}}), b"shout"])
        assert sock.poll(10_000)
        frames = sock.recv_multipart()
        assert isinstance(p.reply_decoder.decode(frames[0]), p.Executed)
        assert frames[1] == b"SHOUT"


# ---------------------------------------------------------------- 4, 5. messages


def test_a_negative_input_shm_size_is_refused_for_its_size(service):
    with raw_dealer(service.endpoint) as sock:
        upper = _loaded_id(sock, PLUGINS / "uppercase.wat")
        name = "wc-1-" + "0" * 32
        reply = exchange(sock, [pack({"type": "execute", "id": 4, "binary_id": upper,
                                      "input_shm": [name, -1]})])
        assert isinstance(reply, p.ErrorReply) and reply.code == "BAD_REQUEST", reply
        assert "size" in reply.message and "-1" in reply.message
        assert "not a segment name" not in reply.message


@pytest.mark.parametrize("count", [0, -3])
def test_a_batch_of_no_inputs_says_so(service, count):
    with raw_dealer(service.endpoint) as sock:
        reply = exchange(sock, [pack({"type": "execute_batch", "id": 11, "binary_id": "x",
                                      "count": count})])
        assert isinstance(reply, p.ErrorReply) and reply.code == "BAD_REQUEST", reply
        assert reply.id == 11
        assert "at least 1" in reply.message, reply.message
        assert "carries 0 input frames" not in reply.message


# ---------------------------------------------------------------- 6. pipelining, integers


def test_requests_pipelined_on_one_dealer_are_answered_by_id(service):
    """docs/protocol.md section 5: send without waiting for replies; replies match by id."""
    with raw_dealer(service.endpoint) as sock:
        upper = _loaded_id(sock, PLUGINS / "uppercase.wat")
        sleeper = _loaded_id(sock, HOSTILE / "sleep.wat")
        sock.send_multipart([pack({"type": "execute", "id": 100, "binary_id": sleeper,
                                   "timeout_ms": 300})])
        for request_id in range(101, 111):
            sock.send_multipart([pack({"type": "execute", "id": request_id,
                                       "binary_id": upper}), str(request_id).encode()])
        sock.send_multipart([pack({"type": "hello", "id": 111})])
        answered: dict[int, object] = {}
        while len(answered) < 12:
            assert sock.poll(15_000), f"replies so far: {sorted(answered)}"
            frames = sock.recv_multipart()
            reply = p.reply_decoder.decode(frames[0])
            answered[reply.id] = reply
            if isinstance(reply, p.Executed) and reply.id != 100:
                assert frames[1] == str(reply.id).encode()
        assert sorted(answered) == list(range(100, 112))


def test_integers_above_2_to_the_32_must_be_msgpack_integers(service):
    with raw_dealer(service.endpoint) as sock:
        upper = _loaded_id(sock, PLUGINS / "uppercase.wat")
        done = exchange(sock, [pack({"type": "execute", "id": 1, "binary_id": upper,
                                     "fuel": 2**40}), b"a"])
        assert isinstance(done, p.Executed), done
        refused = exchange(sock, [pack({"type": "execute", "id": 2, "binary_id": upper,
                                        "fuel": float(2**40)}), b"a"])
        assert isinstance(refused, p.ErrorReply) and refused.code == "BAD_REQUEST"
        assert "float" in refused.message
    doc = (DOCS / "protocol.md").read_text()
    assert "2^32" in doc or "2³²" in doc


# ---------------------------------------------------------------- 3. the doc's tag lists


def test_every_request_and_reply_tag_is_in_the_protocol_doc():
    doc = (DOCS / "protocol.md").read_text()
    glance = doc.split("Tags at a glance", 1)[1].split("\n\n", 2)[1]
    rows = {row.split("|")[1].strip(): set(re.findall(r"`(\w+)`", row.split("|")[2]))
            for row in glance.splitlines()[2:]}
    requests = {struct.__struct_config__.tag for struct in p.Request.__args__}
    replies = {struct.__struct_config__.tag for struct in p.Reply.__args__}
    assert rows["client → server"] == requests
    assert rows["server → client"] == replies
    contents = doc.split("Contents:", 1)[1].split("---", 1)[0]
    assert "xpack" in contents and "rpack" in contents
    # xpack, a request, is described under Requests; rpack, a reply, under Replies.
    section_3 = doc.split("## 3. Requests", 1)[1].split("## 4. Replies", 1)[0]
    section_4 = doc.split("## 4. Replies", 1)[1].split("## 5. Correlation", 1)[0]
    assert '"type": "xpack"' in section_3 and '"type": "xpack"' not in section_4
    assert '"type": "rpack"' in section_4


# ---------------------------------------------------------------- 7. --json output


def _cli(service, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "wasmcore.client.cli", "--endpoint",
                           service.endpoint, *args],
                          input=stdin, capture_output=True, timeout=60)


def test_json_execute_output_is_lossless(service):
    multi = _cli(service, "load", "--path", str(PLUGINS / "multi_entry.wat"))
    binary = multi.stdout.decode().strip()
    data = bytes(range(256))
    done = _cli(service, "--json", "execute", "--binary-id", binary, "--input-file", "-",
                stdin=data)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["output"] is None
    assert base64.b64decode(result["output_base64"]) == data
    text = _cli(service, "--json", "execute", "--binary-id", binary, "--input", "héllo")
    result = json.loads(text.stdout)
    assert result["output"] == "héllo"
    assert base64.b64decode(result["output_base64"]) == "héllo".encode()
    chained = json.loads(_cli(service, "--json", "chain", "--binary-ids", binary,
                              "--input-file", "-", stdin=data).stdout)
    assert chained["output"] is None and base64.b64decode(chained["output_base64"]) == data


# ---------------------------------------------------------------- the hint table (pure)


@pytest.mark.parametrize(
    ("missing", "toolchain"),
    [
        ([("env", "mystery")], None),
        ([("env", "abort"), ("wbg", "anything")], "wasm-bindgen"),
        ([("__wbindgen_placeholder__", "__wbindgen_describe")], "wasm-bindgen"),
        ([("go", "runtime.wasmExit")], "go-js"),  # Go before 1.21
        ([("env", "invoke_vi")], "emscripten"),
        ([("env", "emscripten_memcpy_js"), ("env", "napi_create_object")], "napi-rs"),
        ([("extism:host/user", "kv_get")], "extism"),
    ],
)
def test_the_hint_table(missing, toolchain):
    hint = toolchain_hint(missing)
    assert (hint.toolchain if hint else None) == toolchain


def test_only_a_component_preamble_gets_a_binary_hint():
    assert binary_hint((HOSTILE / "foreign_component.wasm").read_bytes()).toolchain == "component"
    assert binary_hint(b"\0asm\x02\0\0\0") is None
    assert binary_hint(b"(module)") is None
