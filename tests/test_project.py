"""Project-level checks: the shipped config, the quick start, the import rule, lint."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from wasmcore.supervisor.config import (
    Config,
    ConfigError,
    TenantConfig,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_lists_every_default():
    shipped = load_config(ROOT / "config" / "wasm-core.toml")
    assert msgspec.to_builtins(shipped) == msgspec.to_builtins(Config())
    text = (ROOT / "config" / "wasm-core.toml").read_text()
    for table in ("server", "pool", "limits", "sandbox", "wasi"):
        for key in msgspec.to_builtins(getattr(Config(), table)):
            assert re.search(rf"^{key} = ", text, re.M), f"{table}.{key} missing"
    tenant_keys = text.split("[tenants.default]", 1)[1]
    for key in msgspec.to_builtins(TenantConfig()):
        if key == "binaries":  # a table of tables: shown as an example
            assert "[tenants.acme.binaries." in tenant_keys
            continue
        assert re.search(rf"^{key} = ", tenant_keys, re.M), f"tenants.default.{key} missing"


def test_tenant_settings_fall_back_to_default_then_built_in():
    config = parse_config("[tenants.default]\nmax_pending = 7\n[tenants.acme]\nweight = 3\n")
    assert config.tenant("acme") == TenantConfig(weight=3)  # its own table, keys built in
    assert config.tenant("anyone") == TenantConfig(max_pending=7)
    assert parse_config("[tenants.acme]\nweight = 2\n").tenant("anyone") == TenantConfig()
    with pytest.raises(ConfigError, match=r"tenants.acme.weight.*line 2"):
        parse_config("[tenants.acme]\nweight = 0\n")
    with pytest.raises(ConfigError, match=r"server.max_chain_steps"):
        parse_config("[server]\nmax_chain_steps = 0\n")


def test_config_errors_name_key_and_line():
    with pytest.raises(ConfigError, match=r"workerz.*line 3"):
        parse_config("[pool]\nworkers = 1\nworkerz = 2\n")
    with pytest.raises(ConfigError, match=r"pool.recycle_jitter.*line 2"):
        parse_config("[pool]\nrecycle_jitter = 1.5\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("[pool\n")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(python3 -m venv .*)$", readme, re.M)
    assert len(commands) == 2, commands
    assert commands[1] in ci.splitlines()


def test_code_never_imports_bare_supervisor_package():
    # A bare `supervisor` would be supervisord's package; ours installs as wasmcore.supervisor.
    offenders = []
    for path in ROOT.rglob("*.py"):
        if any(part in (".venv", "venv", "build") for part in path.parts):
            continue
        for line in path.read_text().splitlines():
            if re.match(r"\s*(from|import)\s+(supervisor|sandbox_worker)\b", line):
                offenders.append(f"{path}: {line.strip()}")
    assert not offenders, offenders


# Which wasmcore packages each package may import: dependencies point one way, through the
# shared contract (DESIGN.md, Layout). The supervisor starts workers by module name and never
# imports their runtime; a client loads neither process.
IMPORT_RULES = {
    "protocol": {"protocol"},
    "client": {"client", "protocol"},
    "supervisor": {"supervisor", "protocol"},
    "sandbox_worker": {"sandbox_worker", "protocol"},
}


def _wasmcore_imports(path: Path) -> set[str]:
    """The wasmcore packages a module imports (absolute imports; relative ones stay inside
    its own package)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "wasmcore" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_import_rules_hold():
    broken = []
    for package, allowed in IMPORT_RULES.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"no modules found in {package}/"
        for path in files:
            for imported in _wasmcore_imports(path) - allowed:
                broken.append(f"{path.relative_to(ROOT)} imports wasmcore.{imported}")
    assert not broken, "\n".join(broken)


def test_no_mixins_over_shared_state():
    # Components own their state and are composed; a class named *Mixin is the pattern the
    # supervisor was rebuilt away from.
    mixins = [f"{path.relative_to(ROOT)}: {node.name}"
              for package in IMPORT_RULES for path in (ROOT / package).rglob("*.py")
              for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.ClassDef) and node.name.endswith("Mixin")]
    assert not mixins, mixins


@pytest.mark.skipif(shutil.which("ruff") is None and not Path(sys.executable).with_name("ruff")
                    .exists(), reason="ruff not installed")
def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    done = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
