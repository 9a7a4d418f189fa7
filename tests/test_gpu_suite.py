"""benchmarks/gpu_suite.py: its --smoke run drives every path of the GPU suite on the CPU.

The smoke run trains through the project's engine, times the bare loop, trains the
detector, builds and exports a bundle and times ``predict`` with both runtimes, at toy
sizes. These tests check what it writes (every kind of row, numbers that are what they
claim to be, a failing configuration kept as an error row, the budget), not speed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.py"
MEASURED_KINDS = ("classifier_engine", "classifier_bare", "detector_engine", "classifier_inference", "predict")


def _run_suite(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO, check=False)


def _load_suite_module():
    if "gpu_suite" in sys.modules:
        return sys.modules["gpu_suite"]
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One smoke run with a second, impossible classifier configuration (it must become an error row)."""
    root = tmp_path_factory.mktemp("gpu_suite")
    out, work = root / "out", root / "work"
    done = _run_suite("--smoke", "--out", str(out), "--work", str(work),
                      "--classifier", "efficientnet_lite0:48:4", "--classifier", "no_such_backbone:48:4")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return {"out": out, "work": work, "stdout": done.stdout,
            "results": json.loads((out / "results.json").read_text())}


def _rows(results: dict, kind: str) -> list[dict]:
    return [r for r in results["rows"] if r["kind"] == kind]


def _ok(results: dict, kind: str, name: str) -> dict:
    (row,) = [r for r in _rows(results, kind) if r["name"] == name]
    assert row["status"] == "ok", row
    return row


def test_smoke_writes_every_file_and_every_kind_of_row(smoke):
    out, results = smoke["out"], smoke["results"]
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "suite.log"}
    assert results["smoke"] is True and results["device"] == "cpu"
    for kind in MEASURED_KINDS:
        ok = [r for r in _rows(results, kind) if r["status"] == "ok"]
        assert ok, f"no measured {kind} row"
        for row in ok:
            assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0, row
            assert row["seconds"] > 0 and row["settings"], row
            assert row["peak_memory_mib"] is None  # no GPU memory on the CPU
    assert {r["name"] for r in _rows(results, "predict") if r["status"] == "ok"} == {
        "torch-b1", "torch-b4", "onnx-b1", "onnx-b4"}
    assert {r["name"] for r in _rows(results, "setup") if r["status"] == "ok"} == {"data", "bundle"}
    (ddp,) = _rows(results, "ddp")
    assert ddp["status"] == "skipped" and "--ddp-cpu" in ddp["reason"]
    # Progress lines name each row as it starts and ends.
    assert "start classifier_engine efficientnet_lite0-48px-b4" in smoke["stdout"]
    assert "ok predict onnx-b4" in smoke["stdout"]


def test_engine_rows_are_the_second_epoch_of_the_run_and_carry_the_bare_ratio(smoke):
    results = smoke["results"]
    engine = _ok(results, "classifier_engine", "efficientnet_lite0-48px-b4")
    bare = _ok(results, "classifier_bare", "efficientnet_lite0-48px-b4")
    lines = [json.loads(x) for x in (Path(engine["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert engine["images_per_s"] == lines[1]["images_per_s"]
    assert engine["data_wait_fraction"] == lines[1]["data_wait_fraction"]
    assert engine["epoch1_images_per_s"] == lines[0]["images_per_s"]
    assert 0.0 <= engine["data_wait_fraction"] < 1.0
    # smoke: max_steps_per_epoch 2 at batch 4; the bare loop times the same number of steps
    assert engine["steps"] == 2 and bare["steps"] == 2 and bare["settings"]["steps"] == 2
    assert engine["bare_images_per_s"] == bare["images_per_s"]
    assert engine["engine_over_bare"] == pytest.approx(engine["images_per_s"] / bare["images_per_s"], rel=1e-12)
    assert engine["settings"]["image_size"] == 48 and engine["settings"]["cache_size"] == 64  # the engine resized
    detector = next(r for r in _rows(results, "detector_engine") if r["status"] == "ok")
    det_lines = [json.loads(x) for x in (Path(detector["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert detector["images_per_s"] == det_lines[1]["images_per_s"] and detector["steps"] == 2


def test_a_failing_configuration_is_an_error_row_and_the_suite_goes_on(smoke):
    results = smoke["results"]
    bad = [r for r in results["rows"] if r["name"].startswith("no_such_backbone")]
    assert {r["kind"] for r in bad} == {"classifier_engine", "classifier_bare"}
    for row in bad:
        assert row["status"] == "error" and "no_such_backbone" in row["error"], row
        assert row["images_per_s"] is None
    assert any("no_such_backbone" in e for e in results["errors"])
    # Rows after the failure still ran, and the bundle came from the configuration that worked.
    assert _ok(results, "predict", "onnx-b4")["provider"] == "CPUExecutionProvider"
    bundle = _ok(results, "setup", "bundle")
    assert "efficientnet_lite0-48px-b4" in bundle["source"]


def test_markdown_tables_hold_the_rows_and_the_anchors(smoke):
    text = (smoke["out"] / "results.md").read_text()
    engine = _ok(smoke["results"], "classifier_engine", "efficientnet_lite0-48px-b4")
    assert "| efficientnet_lite0 | 48 | 4 |" in text
    assert f"| {engine['engine_over_bare']:.2f} |" in text
    assert "error: ConfigError" in text  # the impossible backbone's cell
    assert "385.56 img/s on an RTX 3090" in text and "2,267.92 img/s on an RTX 4090" in text
    for heading in ("## Classifier training", "## Detector training", "## Inference", "## Distributed (DDP)",
                    "## Errors", "## Skipped"):
        assert heading in text
    assert "| predict | onnx / CPUExecutionProvider | 4 |" in text


def test_a_spent_budget_skips_every_row_and_still_writes_the_results(tmp_path):
    done = _run_suite("--smoke", "--budget-s", "0", "--out", str(tmp_path / "out"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["n_measured"] == 0
    assert results["rows"] and all(r["status"] == "skipped" for r in results["rows"])
    assert results["rows"][0]["name"] == "data" and "budget" in results["rows"][0]["reason"]
    assert len(results["skipped"]) == len(results["rows"])
    assert "## Skipped" in (tmp_path / "out" / "results.md").read_text()


def test_anchor_ratio_only_for_the_anchor_model_and_size():
    suite = _load_suite_module()
    anchor = suite.ANCHORS["train"]["images_per_s"]
    row = {"status": "ok", "images_per_s": 2 * anchor, "settings": {"backbone": "legacy_xception", "image_size": 299}}
    suite._add_anchor_ratio(row, "train")
    assert row["vs_anchor"] == pytest.approx(2.0)
    for settings in ({"backbone": "legacy_xception", "image_size": 256},
                     {"backbone": "efficientnet_lite0", "image_size": 299}):
        other = {"status": "ok", "images_per_s": anchor, "settings": settings}
        suite._add_anchor_ratio(other, "train")
        assert "vs_anchor" not in other
    failed = {"status": "error", "images_per_s": None, "settings": {"backbone": "legacy_xception", "image_size": 299}}
    suite._add_anchor_ratio(failed, "train")
    assert "vs_anchor" not in failed


def test_classifier_option_is_checked():
    suite = _load_suite_module()
    assert suite.parse_classifier_case("legacy_xception:299:64") == suite.ClassifierCase("legacy_xception", 299, 64)
    with pytest.raises(Exception, match="BACKBONE:SIZE:BATCH"):
        suite.parse_classifier_case("legacy_xception:299")


@pytest.mark.slow
def test_ddp_row_runs_torchrun_with_two_ranks_over_gloo(tmp_path):
    work = tmp_path / "work"
    done = _run_suite("--smoke", "--only", "ddp", "--ddp-cpu", "2", "--out", str(tmp_path / "out"), "--work", str(work))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (ddp,) = _rows(results, "ddp")
    assert ddp["status"] == "ok", ddp
    assert ddp["settings"]["processes"] == 2 and ddp["settings"]["backend"] == "gloo"
    assert ddp["images_per_s"] > 0 and ddp["per_process_images_per_s"] == pytest.approx(ddp["images_per_s"] / 2)
    assert ddp["steps"] == 2
    run = Path(ddp["run_dir"])
    digests = [(run / "fold_0" / f"weights_digest_rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]  # two ranks really trained together
    assert all(r["status"] == "skipped" for r in results["rows"] if r["kind"] not in ("setup", "ddp"))
