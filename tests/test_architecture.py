"""The layers of docs/ARCHITECTURE.md, checked on the code.

* Each part imports only the parts below it (:data:`ALLOWED`), at subpackage level,
  counting every import statement, also those inside functions.
* The runtime (``inference`` and ``service``) reaches no training code: following every
  import from every runtime module, no ``lungopacity.engine`` module and no module that
  imports matplotlib when it is loaded is reached.
* Importing the web service for real loads no engine module and no matplotlib.
* Errors the library raises on purpose derive from ``lungopacity.errors.LungOpacityError``:
  no bare ``raise ValueError(...)`` and the like in the package.

The checker is tested on a small fake package too, so a broken checker cannot pass.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "lungopacity"

#: part -> the parts it may import. A part is a subpackage or a top-level module.
ALLOWED: dict[str, set[str]] = {
    "__init__": set(),
    "constants": set(),
    "errors": set(),
    "devices": {"errors"},
    "metrics": {"constants", "errors"},
    "io": {"__init__", "constants", "errors", "metrics"},
    "models": {"constants", "errors", "metrics"},
    "postprocess": {"errors", "metrics"},
    "synthetic": {"constants", "errors", "io"},
    "data": {"__init__", "constants", "errors", "io"},
    "reports": {"constants", "errors", "metrics", "models", "postprocess"},
    "inference": {"__init__", "constants", "errors", "devices", "io", "data", "metrics", "models", "postprocess", "reports"},
    "engine": {"__init__", "constants", "errors", "devices", "io", "data", "metrics", "models", "postprocess", "reports",
               "inference"},
    "service": {"__init__", "constants", "errors", "inference"},
    "node": {"__init__", "constants", "errors", "devices", "io", "inference"},
    "demo": {"__init__", "constants", "errors", "devices", "io", "data", "metrics", "models", "postprocess", "reports",
             "inference", "engine", "synthetic"},
    "cli": {"__init__", "constants", "errors", "devices", "io", "data", "metrics", "models", "postprocess", "reports",
            "inference", "engine", "synthetic", "service", "node", "demo"},
}
RUNTIME_PARTS = ("inference", "service", "node")
TRAINING_PART = "engine"
#: Built-in exceptions that the package must not raise bare for a user's mistake.
BARE_ERRORS = {"ValueError", "FileNotFoundError", "FileExistsError", "KeyError", "OSError", "IOError"}


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def parse_package(src: Path, package: str = PACKAGE) -> tuple[dict[str, set[str]], set[str]]:
    """(module -> the package modules it imports anywhere, modules that import matplotlib at load time)."""
    modules = {module_name(p, src): p for p in (src / package).rglob("*.py")}
    imports: dict[str, set[str]] = defaultdict(set)
    loads_matplotlib: set[str] = set()
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "matplotlib" and id(node) in top_level:
                    loads_matplotlib.add(module)
                if name.split(".")[0] == package:
                    # ``from pkg.sub import name`` may name a module or an attribute: keep modules only.
                    while name not in modules and "." in name:
                        name = name.rsplit(".", 1)[0]
                    if name in modules and name != module:
                        imports[module].add(name)
    for module in modules:
        imports.setdefault(module, set())
    return dict(imports), loads_matplotlib


def layer_violations(imports: dict[str, set[str]], allowed: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(imports.items()):
        source = part_of(module)
        for target in sorted(targets):
            dest = part_of(target)
            if dest != source and dest not in allowed.get(source, set()):
                found.append(f"{module} imports {target} ({source} may not import {dest})")
    return found


def runtime_violations(imports: dict[str, set[str]], loads_matplotlib: set[str]) -> list[str]:
    """Training code or matplotlib reachable from a runtime module, with the chain that reaches it."""
    found = []
    for start in sorted(m for m in imports if part_of(m) in RUNTIME_PARTS):
        seen, stack = {start: [start]}, [start]
        while stack:
            current = stack.pop()
            for nxt in imports.get(current, ()):
                if nxt not in seen:
                    seen[nxt] = seen[current] + [nxt]
                    stack.append(nxt)
        for reached, chain in sorted(seen.items()):
            if part_of(reached) == TRAINING_PART:
                found.append(f"{start} reaches training code: {' -> '.join(chain)}")
            elif reached in loads_matplotlib:
                found.append(f"{start} reaches matplotlib: {' -> '.join(chain)}")
    return found


def bare_raises(src: Path, package: str = PACKAGE) -> list[str]:
    found = []
    for path in sorted((src / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                if isinstance(func, ast.Name) and func.id in BARE_ERRORS:
                    found.append(f"{path.relative_to(src)}:{node.lineno}: raise {func.id}(...)")
    return found


# ------------------------------------------------------------------------ the package


def test_every_part_is_in_the_layer_table() -> None:
    imports, _ = parse_package(SRC)
    assert {part_of(m) for m in imports} <= set(ALLOWED)


def test_parts_import_only_the_parts_below_them() -> None:
    imports, _ = parse_package(SRC)
    assert layer_violations(imports, ALLOWED) == []


def test_the_runtime_reaches_no_training_code_and_no_matplotlib() -> None:
    imports, loads_matplotlib = parse_package(SRC)
    assert loads_matplotlib, "the parser found no module that loads matplotlib: the check would be vacuous"
    assert runtime_violations(imports, loads_matplotlib) == []


def test_importing_the_service_loads_no_engine_module() -> None:
    code = (
        "import sys\n"
        "import lungopacity.service.app\n"
        "import lungopacity.inference.predictor, lungopacity.inference.batch, lungopacity.inference.onnx\n"
        "bad = sorted(m for m in sys.modules if m.startswith('lungopacity.engine') or m.split('.')[0] == 'matplotlib')\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_errors_raised_on_purpose_derive_from_the_error_base() -> None:
    assert bare_raises(SRC) == []


# ---------------------------------------------------------------- the checker itself


def _fake_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def fake_src(tmp_path: Path) -> Path:
    return _fake_package(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "reports/__init__.py": "",
        "reports/plots.py": "import matplotlib\n",
        "reports/overlays.py": "import PIL\n",
        "engine/__init__.py": "",
        "engine/loop.py": "from lungopacity.errors import x\n",
        "inference/__init__.py": "",
        "inference/predictor.py": (
            "from lungopacity.reports.overlays import draw\n"
            "def f():\n    from lungopacity.inference.helper import g\n"
        ),
        "inference/helper.py": "def g():\n    from lungopacity.engine import loop\n",
        "io/__init__.py": "",
        "io/reader.py": "def r():\n    raise ValueError('bad')\n",
        "service/__init__.py": "",
        "service/app.py": "from lungopacity.reports import plots\n",
    })


def test_checker_finds_a_lazy_runtime_import_of_training_code(fake_src: Path) -> None:
    imports, loads_matplotlib = parse_package(fake_src)
    found = runtime_violations(imports, loads_matplotlib)
    assert any("lungopacity.inference.predictor reaches training code" in f and "lungopacity.engine.loop" in f
               for f in found)
    assert any("lungopacity.service.app reaches matplotlib" in f for f in found)
    assert layer_violations(imports, ALLOWED) == [
        "lungopacity.inference.helper imports lungopacity.engine (inference may not import engine)",
        "lungopacity.inference.helper imports lungopacity.engine.loop (inference may not import engine)",
        "lungopacity.service.app imports lungopacity.reports (service may not import reports)",
        "lungopacity.service.app imports lungopacity.reports.plots (service may not import reports)",
    ]


def test_checker_finds_a_bare_raise(fake_src: Path) -> None:
    assert bare_raises(fake_src) == ["lungopacity/io/reader.py:2: raise ValueError(...)"]
