"""``lungopacity serve``: its options, their environment variables and the exposure warning.

The library's ``serve`` is replaced by a recorder, so nothing is loaded or bound.
"""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from lungopacity.cli import app

ENV_VARS = (
    "LUNGOPACITY_BUNDLE", "LUNGOPACITY_HOST", "LUNGOPACITY_PORT", "LUNGOPACITY_MAX_UPLOAD_MB", "LUNGOPACITY_CONCURRENCY",
    "LUNGOPACITY_QUEUE", "LUNGOPACITY_MAX_UPLOADS", "LUNGOPACITY_UPLOAD_TIMEOUT", "LUNGOPACITY_STALL_TIMEOUT",
    "LUNGOPACITY_HEADER_TIMEOUT", "LUNGOPACITY_KEEP_ALIVE_TIMEOUT", "LUNGOPACITY_TOKEN", "LUNGOPACITY_ALLOWED_HOSTS",
)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The calls the command makes to ``lungopacity.service.app.serve``."""
    calls: list[dict[str, Any]] = []

    def record(bundle: Any, **kwargs: Any) -> None:
        calls.append({"bundle": str(bundle), **kwargs})

    monkeypatch.setattr("lungopacity.service.app.serve", record)
    # The command checks the bundle before serving (tests/test_cli_errors.py covers that); no bundle here.
    monkeypatch.setattr("lungopacity.inference.bundle.read_manifest", lambda path: None)
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return calls


def invoke(args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, ["serve", *args], env=env)


def test_defaults_are_local_and_quiet(served: list[dict[str, Any]]) -> None:
    result = invoke(["--bundle", "model"])
    assert result.exit_code == 0, result.output
    assert served == [{
        "bundle": "model", "host": "127.0.0.1", "port": 8000, "max_upload_bytes": 50 * 2**20, "max_concurrent": 2,
        "max_queue": 8, "max_uploads": 32, "upload_timeout": 120.0, "stall_timeout": 10.0, "header_timeout": 10.0,
        "keep_alive_timeout": 5, "token": None, "allowed_hosts": [],
    }]
    assert "warning" not in result.stderr and "note" not in result.stderr


def test_settings_come_from_the_environment(served: list[dict[str, Any]]) -> None:
    env = {
        "LUNGOPACITY_BUNDLE": "/models/v3", "LUNGOPACITY_HOST": "0.0.0.0", "LUNGOPACITY_PORT": "9001",
        "LUNGOPACITY_MAX_UPLOAD_MB": "10", "LUNGOPACITY_CONCURRENCY": "4", "LUNGOPACITY_QUEUE": "3",
        "LUNGOPACITY_MAX_UPLOADS": "7", "LUNGOPACITY_UPLOAD_TIMEOUT": "60", "LUNGOPACITY_STALL_TIMEOUT": "4.5",
        "LUNGOPACITY_HEADER_TIMEOUT": "3", "LUNGOPACITY_KEEP_ALIVE_TIMEOUT": "9", "LUNGOPACITY_TOKEN": "tok-123",
        "LUNGOPACITY_ALLOWED_HOSTS": "xray.example, *.ward.example  10.0.0.5",
    }
    result = invoke([], env=env)
    assert result.exit_code == 0, result.output
    assert served == [{
        "bundle": "/models/v3", "host": "0.0.0.0", "port": 9001, "max_upload_bytes": 10 * 2**20, "max_concurrent": 4,
        "max_queue": 3, "max_uploads": 7, "upload_timeout": 60.0, "stall_timeout": 4.5, "header_timeout": 3.0,
        "keep_alive_timeout": 9, "token": "tok-123", "allowed_hosts": ["xray.example", "*.ward.example", "10.0.0.5"],
    }]
    assert "warning" not in result.stderr  # beyond localhost, but with a token
    assert "tok-123" not in result.output  # the token is never printed


def test_flags_win_over_the_environment(served: list[dict[str, Any]]) -> None:
    result = invoke(
        ["--bundle", "b", "--port", "8123", "--allowed-host", "a.example", "--allowed-host", "b.example"],
        env={"LUNGOPACITY_PORT": "9001", "LUNGOPACITY_ALLOWED_HOSTS": "c.example"},
    )
    assert result.exit_code == 0, result.output
    assert served[0]["port"] == 8123 and served[0]["allowed_hosts"] == ["a.example", "b.example"]


def test_binding_beyond_localhost_without_a_token_warns(served: list[dict[str, Any]]) -> None:
    result = invoke(["--bundle", "b", "--host", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    assert "warning: serving on 0.0.0.0 without a token: anyone who can reach port 8000 can use the API" in result.stderr
    assert "--allowed-host" in result.stderr  # and says how remote clients get in
    assert served[0]["token"] is None
    quiet = invoke(["--bundle", "b", "--host", "0.0.0.0", "--allowed-host", "x.example"], env={"LUNGOPACITY_TOKEN": "t"})
    assert "warning" not in quiet.stderr and "note" not in quiet.stderr
    for local in ("127.0.0.1", "localhost", "::1"):
        assert "warning" not in invoke(["--bundle", "b", "--host", local]).stderr


def test_empty_token_variable_means_no_token(served: list[dict[str, Any]]) -> None:
    result = invoke(["--bundle", "b", "--host", "0.0.0.0"], env={"LUNGOPACITY_TOKEN": ""})
    assert served[0]["token"] is None and "without a token" in result.stderr


def test_help_names_every_environment_variable() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "250", "TERM": "dumb"})
    assert result.exit_code == 0
    for name in ENV_VARS:
        assert name in result.output, name


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--concurrency", "0"], {}),
        (["--port", "70000"], {}),
        ([], {"LUNGOPACITY_STALL_TIMEOUT": "0"}),
        ([], {"LUNGOPACITY_MAX_UPLOADS": "many"}),
    ],
)
def test_out_of_range_settings_are_usage_errors(served: list[dict[str, Any]], args: list[str], env: dict[str, str]) -> None:
    result = invoke(["--bundle", "b", *args], env=env)
    assert result.exit_code == 2 and "Invalid value" in result.stderr
    assert served == []


def test_library_serve_refuses_bad_settings_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    from lungopacity.errors import ConfigError
    from lungopacity.service import app as service_app

    def never(*_: Any, **__: Any) -> Any:
        raise AssertionError("the bundle was loaded before the settings were checked")

    monkeypatch.setattr(service_app, "load_predictor", never)
    with pytest.raises(ConfigError, match="--allowed-host"):
        service_app.serve("missing-bundle", allowed_hosts=["http://x"])
    with pytest.raises(ConfigError, match="--token"):
        service_app.serve("missing-bundle", token="two words")
