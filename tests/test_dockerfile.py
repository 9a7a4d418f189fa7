"""The Dockerfile, parsed with Docker's own parser (the ``dockerfile`` package), against the
rules a hospital deployment needs: a pinned base, a non-root user, a health check, no
secrets, CPU torch, the service as the entry point. No image can be pulled or built here,
so this is what CI can check; every rule is also shown to catch a bad Dockerfile."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

dockerfile = pytest.importorskip("dockerfile", reason="the dockerfile package (the dev extra) is not installed")

REPO = Path(__file__).resolve().parents[1]
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|API_?KEY|PRIVATE_?KEY|CREDENTIAL", re.IGNORECASE)
SECRET_FILE = re.compile(r"(^|/)(\.env(\..*)?|[^/]*\.env|[^/]*\.pem|[^/]*\.key|id_rsa[^/]*|id_ed25519[^/]*|\.ssh|"
                         r"\.netrc|\.npmrc|\.pypirc|credentials[^/]*)$")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
EXACT_VERSION_TAG = re.compile(r"^\d+\.\d+\.\d+([.-].*)?$")  # 3.12.8-slim-bookworm, not 3.12-slim


def _substitute(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def _pairs(command: Any) -> list[tuple[str, str]]:
    """``(name, value)`` of an ENV or ARG instruction (value "" when none is given)."""
    if command.cmd == "ARG":
        return [tuple(v.split("=", 1)) if "=" in v else (v, "") for v in command.value]  # type: ignore[misc]
    values = list(command.value)
    return list(zip(values[0::2], values[1::2]))


def _stages(commands: list[Any]) -> tuple[dict[str, str], list[list[Any]]]:
    """Global ARG defaults (before the first FROM) and the instructions of each stage."""
    global_args: dict[str, str] = {}
    stages: list[list[Any]] = []
    for command in commands:
        if command.cmd == "FROM":
            stages.append([command])
        elif stages:
            stages[-1].append(command)
        elif command.cmd == "ARG":
            global_args.update(_pairs(command))
    return global_args, stages


def lint_dockerfile(text: str) -> list[str]:
    """Problems of a Dockerfile, each ``"<rule>: <what>"``; empty when it passes."""
    problems: list[str] = []
    commands = list(dockerfile.parse_string(text))
    global_args, stages = _stages(commands)
    if not stages:
        return ["multi-stage: no FROM"]
    aliases: set[str] = set()
    for stage in stages:
        parts = stage[0].value
        image = _substitute(parts[0], global_args)
        if image not in aliases and image != "scratch":
            name = image.partition("@")[0]
            tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
            if not (DIGEST.search(image) or EXACT_VERSION_TAG.match(tag)):
                problems.append(f"pinned-base: FROM {image} is neither a digest nor an exact version tag")
        if len(parts) == 3 and parts[1].upper() == "AS":
            aliases.add(parts[2])
    final = stages[-1]
    if len(stages) < 2 or not any(c.cmd == "COPY" and any(f.startswith("--from=") for f in c.flags) for c in final):
        problems.append("multi-stage: the final stage should copy its build from a builder stage")

    for command in commands:
        if command.cmd in ("ENV", "ARG"):
            for name, value in _pairs(command):
                if SECRET_NAME.search(name) and value:
                    problems.append(f"no-secrets: {command.cmd} {name} carries a value (pass it at run time)")
        if command.cmd in ("COPY", "ADD"):
            sources = list(command.value[:-1])
            for source in sources:
                if SECRET_FILE.search(source.rstrip("/")):
                    problems.append(f"no-secrets: {command.cmd} {source} copies a credentials file")
                if command.cmd == "ADD" and re.match(r"https?://", source):
                    problems.append(f"no-add-url: ADD {source} downloads at build time (use a pinned RUN step)")

    variables = dict(global_args)
    final_text: dict[str, list[str]] = {}
    for command in final:
        if command.cmd in ("ENV", "ARG"):
            variables.update({k: v for k, v in _pairs(command) if v})
        final_text.setdefault(command.cmd, []).append(_substitute(" ".join(command.value), variables))

    users = [u.split(":")[0] for u in final_text.get("USER", [])]
    if not users or users[-1] in ("root", "0"):
        problems.append("non-root-user: the final stage must end on a USER other than root")
    checks = final_text.get("HEALTHCHECK", [])
    if not checks or checks[-1].upper().startswith("NONE"):
        problems.append("healthcheck: the final stage needs a HEALTHCHECK")
    elif "/healthz" not in checks[-1] or re.search(r"\b(curl|wget)\b", checks[-1]):
        problems.append("healthcheck: should request /healthz with Python (no curl or wget in the slim image)")
    torch_installs = [r for r in final_text.get("RUN", []) if re.search(r"pip install .*\btorch\b", r)]
    if not any(f"--index-url {CPU_TORCH_INDEX}" in r for r in torch_installs):
        problems.append(f"cpu-torch: torch must be installed from --index-url {CPU_TORCH_INDEX}")
    entry = " ".join(final_text.get("ENTRYPOINT", []) + final_text.get("CMD", []))
    if "lungopacity serve" not in entry or "--host 0.0.0.0" not in entry:
        problems.append("service-entrypoint: ENTRYPOINT should run `lungopacity serve --host 0.0.0.0`")
    if not final_text.get("EXPOSE"):
        problems.append("expose: the final stage should EXPOSE the service port")
    return problems


GOOD = (REPO / "Dockerfile").read_text()


def test_the_dockerfile_passes_every_rule():
    assert lint_dockerfile(GOOD) == []


def test_the_dockerfile_reads_the_bundle_from_a_volume_and_the_environment():
    commands = list(dockerfile.parse_string(GOOD))
    final = _stages(commands)[1][-1]
    env = dict(pair for c in final if c.cmd == "ENV" for pair in _pairs(c))
    assert env["LUNGOPACITY_BUNDLE"].startswith("/models")
    assert any(c.cmd == "VOLUME" and "/models" in c.value for c in final)
    entry = next(c for c in final if c.cmd == "ENTRYPOINT")
    assert entry.json and '--bundle "$LUNGOPACITY_BUNDLE"' in " ".join(entry.value)
    assert not any(c.cmd == "ADD" for c in commands)


def _replace(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new)


def _drop_lines(prefix: str) -> str:
    lines, out, skipping = GOOD.splitlines(), [], False
    for line in lines:
        if line.startswith(prefix):
            skipping = line.rstrip().endswith("\\")
            continue
        if skipping:
            skipping = line.rstrip().endswith("\\")
            continue
        out.append(line)
    return "\n".join(out) + "\n"


BAD = {
    "floating tag": (_replace("FROM python:3.12.8-slim-bookworm AS runtime", "FROM python:3.12-slim AS runtime"),
                     "pinned-base"),
    "latest": (_replace("FROM python:3.12.8-slim-bookworm AS builder", "FROM python:latest AS builder"),
               "pinned-base"),
    "no tag": (_replace("FROM python:3.12.8-slim-bookworm AS builder", "FROM python AS builder"), "pinned-base"),
    "ARG tag": ("ARG TAG=3.12\n" + _replace("FROM python:3.12.8-slim-bookworm AS builder", "FROM python:${TAG} AS builder"),
                "pinned-base"),
    "no USER": (_drop_lines("USER "), "non-root-user"),
    "USER root": (_replace("USER 10001:10001", "USER root"), "non-root-user"),
    "USER 0": (_replace("USER 10001:10001", "USER 0:0"), "non-root-user"),
    "no HEALTHCHECK": (_drop_lines("HEALTHCHECK"), "healthcheck"),
    "HEALTHCHECK NONE": (_drop_lines("HEALTHCHECK") + "HEALTHCHECK NONE\n", "healthcheck"),
    "curl": (_drop_lines("HEALTHCHECK") + "HEALTHCHECK CMD curl -f http://127.0.0.1:8000/healthz\n", "healthcheck"),
    "ENV token": (GOOD + "ENV LUNGOPACITY_TOKEN=s3cret\n", "no-secrets"),
    "ARG password": (_replace("ARG TORCH_INDEX_URL", "ARG DB_PASSWORD=hunter2\nARG TORCH_INDEX_URL"), "no-secrets"),
    "COPY .env": (_replace("COPY src ./src", "COPY src ./src\nCOPY .env /src/.env"), "no-secrets"),
    "COPY key": (_replace("COPY src ./src", "COPY src ./src\nCOPY deploy/server.key /etc/key"), "no-secrets"),
    "ADD url": (_replace("COPY src ./src", "COPY src ./src\nADD https://example.org/w.bin /w.bin"), "no-add-url"),
    "PyPI torch": (_replace("--index-url ${TORCH_INDEX_URL} ", ""), "cpu-torch"),
    "CUDA index": (_replace("whl/cpu", "whl/cu121"), "cpu-torch"),
    "other entrypoint": (_drop_lines("ENTRYPOINT") + 'ENTRYPOINT ["python", "-m", "http.server"]\n',
                         "service-entrypoint"),
    "localhost only": (_replace("--host 0.0.0.0", "--host 127.0.0.1"), "service-entrypoint"),
    "no EXPOSE": (_drop_lines("EXPOSE"), "expose"),
    "single stage": ("FROM python:3.12.8-slim-bookworm\nRUN pip install --index-url " + CPU_TORCH_INDEX + " torch\n"
                     "USER 1000\nEXPOSE 8000\nHEALTHCHECK CMD python -c \"import urllib.request as u; "
                     "u.urlopen('http://127.0.0.1:8000/healthz')\"\n"
                     'ENTRYPOINT ["lungopacity", "serve", "--host 0.0.0.0"]\n', "multi-stage"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_rule_catches_a_bad_dockerfile(case):
    text, rule = BAD[case]
    problems = lint_dockerfile(text)
    assert [p.split(":")[0] for p in problems] == [rule], problems


def test_a_digest_pin_passes():
    digest = "sha256:" + "0123456789abcdef" * 4
    text = GOOD.replace("python:3.12.8-slim-bookworm", f"python:3.12-slim-bookworm@{digest}")
    assert lint_dockerfile(text) == []


def test_dockerignore_keeps_data_runs_environments_and_credentials_out():
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert "*" in patterns  # everything out, then the three inputs of the wheel back in
    assert {"!pyproject.toml", "!README.md", "!src/"} <= patterns
    assert {".git", ".venv", "data", "runs", "demo-run", ".env", "*.pem", "*.key"} <= patterns
    # What the builder stage COPYs is exactly what the ignore file lets in.
    copied = {v for c in dockerfile.parse_string(GOOD) if c.cmd == "COPY" and not c.flags for v in c.value[:-1]}
    assert copied == {"pyproject.toml", "README.md", "src"}
