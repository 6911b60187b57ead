"""Unit tier: the package's architecture as tests.

core imports no Dagster and neither of the layers above it; nothing but cli imports cli; every module imports on
its own (no import cycle hides behind the order the others happen to be imported in); importing the package reads
no setting and loads no Dagster.
"""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bge_pipeline
from bge_pipeline.core.settings import Settings

pytestmark = pytest.mark.unit

PACKAGE_DIR = Path(bge_pipeline.__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
BAD_SETTINGS = {"EMBEDDING_DEVICE": "tpu", "EMBEDDING_BATCH_SIZE": "abc", "RETURN_TOP_K": "not a number"}


# --- what each file imports, read from its source ---------------------------------------------------------


def module_name(path: Path, root: Path = REPO_ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module an `import`, a `from ... import` (at any depth: in functions too, relative ones resolved) or an
    `importlib.import_module("...")` names; `from a import b` yields both `a` and `a.b`."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base = ".".join(base_parts[: len(base_parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def is_dagster(name: str) -> bool:
    return is_under(name, "dagster") or name.startswith("dagster_")


def source_files(layer: str = "") -> list[Path]:
    return sorted((PACKAGE_DIR / layer).rglob("*.py"))


def imports_of(path: Path) -> set[str]:
    return imported_names(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


def test_the_import_reader_sees_nested_relative_and_dynamic_imports() -> None:
    source = textwrap.dedent(
        """
        import os
        from . import sql
        from ..defs.resources import DatabaseResource

        def later():
            import dagster as dg
            from dagster_postgres import x
            importlib.import_module("bge_pipeline.cli.main")

        class C:
            def method(self):
                from bge_pipeline import defs
        """
    )
    found = imported_names(source, "bge_pipeline.core.example")
    assert {"os", "bge_pipeline.core.sql", "bge_pipeline.defs.resources", "dagster", "dagster_postgres"} <= found
    assert {"bge_pipeline.cli.main", "bge_pipeline.defs"} <= found
    assert imported_names("from . import x", "bge_pipeline.core", is_package=True) == {
        "bge_pipeline.core",
        "bge_pipeline.core.x",
    }


def test_every_layer_has_modules() -> None:
    # Guards the tests below against passing because a layer moved and they read nothing.
    for layer in ("core", "defs", "cli"):
        assert len(source_files(layer)) >= 3, layer


@pytest.mark.parametrize("path", source_files("core"), ids=lambda path: path.stem)
def test_core_imports_neither_dagster_nor_the_layers_above(path: Path) -> None:
    forbidden = sorted(
        name
        for name in imports_of(path)
        if is_dagster(name) or is_under(name, "bge_pipeline.defs") or is_under(name, "bge_pipeline.cli")
    )
    assert forbidden == [], f"{module_name(path)} imports {forbidden}"


def test_only_cli_imports_cli() -> None:
    offenders = {
        module_name(path): sorted(name for name in imports_of(path) if is_under(name, "bge_pipeline.cli"))
        for path in source_files()
        if not is_under(module_name(path), "bge_pipeline.cli")
    }
    assert {module: names for module, names in offenders.items() if names} == {}


def test_defs_does_not_import_cli() -> None:
    offenders = [
        module_name(path)
        for path in source_files("defs")
        if any(is_under(name, "bge_pipeline.cli") for name in imports_of(path))
    ]
    assert offenders == []


# --- what importing does, in fresh interpreters -------------------------------------------------------------


def clean_environment(**extra: str) -> dict[str, str]:
    """This interpreter's environment without any setting, plus `extra`; the package found from this checkout."""
    env = {name: value for name, value in os.environ.items() if name.lower() not in Settings.model_fields}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_python(code: str, cwd: Path, env: dict[str, str], *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# Import each module as the first of its package in this interpreter: every bge_pipeline entry is dropped from
# sys.modules before each import, so a cycle that a fresh `python -c "import X"` would hit is hit here too, without
# paying one interpreter start per module. Third-party modules stay loaded; they are not what is being tested.
IMPORT_EACH = textwrap.dedent(
    """
    import importlib, json, sys, traceback
    sys.path.insert(0, sys.argv[1])
    package, modules = sys.argv[2], sys.argv[3:]
    failures, dagster_before_defs = {}, None
    for name in modules:
        if dagster_before_defs is None and name.startswith(package + ".defs"):
            dagster_before_defs = "dagster" in sys.modules
        for loaded in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[loaded]
        try:
            importlib.import_module(name)
        except BaseException:
            failures[name] = traceback.format_exc(limit=-3)
    print(json.dumps({"failures": failures, "dagster_before_defs": dagster_before_defs}))
    """
)


def package_modules() -> list[str]:
    names = [
        info.name
        for info in pkgutil.walk_packages(bge_pipeline.__path__, "bge_pipeline.")
        if not info.name.endswith(".__main__")  # a script: importing it runs the command
    ]
    layer_order = {"bge_pipeline.core": 0, "bge_pipeline.cli": 1, "bge_pipeline.defs": 2}
    return sorted(names, key=lambda name: (layer_order.get(".".join(name.split(".")[:2]), 1), name))


def test_package_modules_are_found() -> None:
    modules = package_modules()
    assert "bge_pipeline.core.settings" in modules and "bge_pipeline.defs.definitions" in modules
    assert "bge_pipeline.cli.main" in modules
    assert len(modules) >= 30


def test_every_module_imports_on_its_own_with_bad_settings(tmp_path: Path) -> None:
    """Also: importing reads no setting (bad ones are in the environment) and core and cli load no Dagster."""
    modules = package_modules()
    result = run_python(
        IMPORT_EACH, tmp_path, clean_environment(**BAD_SETTINGS), str(REPO_ROOT), "bge_pipeline", *modules
    )
    assert result["failures"] == {}
    assert result["dagster_before_defs"] is False, "a core or cli module imported dagster at import time"


def test_the_import_check_catches_a_cycle(tmp_path: Path) -> None:
    """A cycle that bites only when `a` is imported first: `b` first loads both fine, and a check that kept `a`
    loaded from then on would pass it."""
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic import b\n\nVALUE = 1\n")
    (package / "b.py").write_text("from cyclic.a import VALUE\n")
    result = run_python(IMPORT_EACH, tmp_path, clean_environment(), str(tmp_path), "cyclic", "cyclic.b", "cyclic.a")
    assert list(result["failures"]) == ["cyclic.a"]
    assert "ImportError" in result["failures"]["cyclic.a"]


def test_importing_the_package_reads_no_setting_and_loads_no_dagster(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import json, sys
        import bge_pipeline
        print(json.dumps({
            "dagster": "dagster" in sys.modules,
            # dagster's `-m bge_pipeline` finds the lazy definitions through dir(): listing them must not load them
            "all_listed": set(bge_pipeline.__all__) <= set(dir(bge_pipeline)),
            "dagster_after_dir": "dagster" in sys.modules,
            "models": [m for m in ("sentence_transformers", "transformers") if m in sys.modules],
        }))
        """
    )
    result = run_python(code, tmp_path, clean_environment(**BAD_SETTINGS))
    assert result == {"dagster": False, "all_listed": True, "dagster_after_dir": False, "models": []}


def test_the_library_api_imports_no_dagster(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import json, sys
        from bge_pipeline import EmbeddingsService, search_segments
        assert callable(search_segments) and hasattr(EmbeddingsService, "encode_query")
        print(json.dumps({"dagster": "dagster" in sys.modules}))
        """
    )
    assert run_python(code, tmp_path, clean_environment(**BAD_SETTINGS)) == {"dagster": False}
