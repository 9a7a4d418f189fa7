"""The one epoch loop (engine/loop.py) on a toy task: non-finite losses, selection, early stopping,
stale temporary files, TensorBoard event files, and the safe checkpoint format.

The toy task is a 16 -> 2 linear layer on 4 x 4 images, so each test takes well under a second;
the classifier and detector tests exercise the same loop on real networks.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lungopacity.engine import loop as loop_module
from lungopacity.engine import tensorboard as tensorboard_module
from lungopacity.engine.checkpoint import atomic_torch_save, load_checkpoint, remove_stale_temp_files
from lungopacity.engine.common import DistributedContext, SilentProgress
from lungopacity.engine.loop import EpochLoop, Evaluation, LoopFiles, LoopSettings, StepContext, TrainingTask
from lungopacity.errors import CheckpointError, TrainingDivergedError

SRC = Path(__file__).resolve().parents[1] / "src" / "lungopacity"


class ToyImages(Dataset):
    def __init__(self, n: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=generator)
        self.labels = (self.images.float().mean(dim=(1, 2, 3)) > 127).long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i]), "target": int(self.labels[i]),
                "boxes": torch.zeros((0, 4)), "position": i}


class ToyNet(torch.nn.Linear):
    def __init__(self) -> None:
        super().__init__(16, 2)

    def config(self) -> dict:
        return {"kind": "toy", "shape": (16, 2)}  # a tuple: stored as a list


class ToyTask(TrainingTask):
    """Cross-entropy on a linear layer; scripted scores per epoch and non-finite steps on demand."""

    label = "toy"

    def __init__(self, scores=None, nan_steps=(), all_nan=False) -> None:
        self.train_dataset = ToyImages()
        self.train_config = {"toy": True, "nested": {"value": np.float64(0.5)}}
        self.scores, self.nan_steps, self.all_nan = list(scores or []), set(nan_steps), all_nan
        self.calls = 0
        self.evaluations = 0

    def build_model(self) -> torch.nn.Module:
        return ToyNet()

    def train_step(self, batch, step: StepContext) -> dict:
        self.calls += 1
        x = batch["image"].float().flatten(1) / 255
        with step.autocast():
            loss = F.cross_entropy(step.model(x), batch["label"])
        if self.all_nan or self.calls in self.nan_steps:
            loss = loss * float("nan")
        return {"loss": loss, "half": loss / 2}

    def evaluate(self, model) -> Evaluation:
        score = self.scores[self.evaluations] if self.evaluations < len(self.scores) else 0.0
        self.evaluations += 1
        weights = model.weight.detach().clone()
        return Evaluation({"val_score": score, "val_dict": {"a": 1.0, "b": np.float32(2.0)}}, score,
                          payload=weights, curves={"val_curve": (np.array([0, 1, 1, 0]), np.array([0.1, 0.9, 0.7, 0.2]))})


def settings(**overrides) -> LoopSettings:
    values = dict(epochs=3, batch_size=8, seed=3, recipe="finetune", lr=1e-2, weight_decay=None, grad_clip=1.0,
                  patience=10, augment=None, amp=True, channels_last=False, max_steps_per_epoch=2)
    values.update(overrides)
    return LoopSettings(**values)


def make_loop(tmp_path: Path, task: TrainingTask | None = None, *, board: bool = False, **overrides) -> EpochLoop:
    files = LoopFiles(tmp_path / "run", tmp_path / "run" / "metrics.jsonl",
                      tensorboard=tmp_path / "run" / "tensorboard" if board else None)
    files.folder.mkdir(parents=True, exist_ok=True)
    return EpochLoop(task or ToyTask(), settings(**overrides), files, device=torch.device("cpu"),
                     context=DistributedContext(), progress=SilentProgress())


def metric_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ non-finite losses


def test_a_non_finite_step_is_skipped_counted_and_leaves_the_weights_alone(tmp_path):
    task = ToyTask(nan_steps={2})  # the second step of epoch 1
    loop = make_loop(tmp_path, task, epochs=1, max_steps_per_epoch=3)
    before = loop.model.weight.detach().clone()
    updates = []
    real_step = loop.scaler.step

    def counting_step(*args, **kwargs):
        updates.append(1)
        return real_step(*args, **kwargs)

    loop.scaler.step = counting_step
    loop.fit()
    (record,) = metric_lines(tmp_path / "run" / "metrics.jsonl")
    assert record["skipped_steps"] == 1
    assert len(updates) == 2  # three steps, one skipped
    assert math.isfinite(record["train_loss"]) and record["train_half"] == pytest.approx(record["train_loss"] / 2)
    assert torch.isfinite(loop.model.weight).all() and not torch.equal(loop.model.weight, before)
    assert loop.scheduler.last_epoch == 3  # the schedule moves on over a skipped step


def test_an_epoch_of_only_non_finite_steps_stops_with_one_line(tmp_path):
    loop = make_loop(tmp_path, ToyTask(all_nan=True), epochs=2)
    with pytest.raises(TrainingDivergedError) as caught:
        loop.fit()
    message = str(caught.value)
    assert message.startswith("toy epoch 1: every step had a non-finite loss") and "\n" not in message
    assert isinstance(caught.value, FloatingPointError)
    assert not (tmp_path / "run" / "last.pt").exists()


# ------------------------------------------------------------------------- selection


def test_select_best_stops_early_and_keeps_the_best_epoch(tmp_path):
    task = ToyTask(scores=[0.5, 0.7, 0.6, 0.65, 0.9])
    result = make_loop(tmp_path, task, epochs=5, patience=2).fit()
    assert [r["epoch"] for r in metric_lines(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert result.best_epoch == 2 and result.best_score == 0.7 and result.epochs_run == 4
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == 2 and best["metrics"]["val_score"] == 0.7
    assert torch.equal(best["model"]["weight"], result.best_payload)


def test_select_last_keeps_the_final_epoch_and_never_stops_early(tmp_path):
    task = ToyTask(scores=[0.9, 0.5, 0.4, 0.3, 0.2])
    result = make_loop(tmp_path, task, epochs=5, patience=1, select="last").fit()
    assert [r["epoch"] for r in metric_lines(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert result.best_epoch == 5 and result.best_score == 0.2
    best, last = load_checkpoint(tmp_path / "run" / "best.pt"), load_checkpoint(tmp_path / "run" / "last.pt")
    assert best["epoch"] == 5 and last["epoch"] == 5
    for name, tensor in last["model"].items():
        assert torch.equal(best["model"][name], tensor)
    assert torch.equal(result.best_payload, last["model"]["weight"])


# ------------------------------------------------------------------------ checkpoints


def test_checkpoints_hold_only_what_weights_only_loading_accepts(tmp_path):
    make_loop(tmp_path, ToyTask(scores=[0.1, 0.2]), epochs=2).fit()
    for name in ("last.pt", "best.pt"):
        path = tmp_path / "run" / name
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], name
        plain = torch.load(path, weights_only=True)  # no allow-list needed
        assert plain["format_version"] == 2
        assert plain["model_config"] == {"kind": "toy", "shape": [16, 2]}
        assert plain["train_config"] == {"toy": True, "nested": {"value": 0.5}}
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert isinstance(state["rng"]["python"], list) and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    assert type(state["history"][0]["val_dict"]["b"]) is float


def _exploit_path(marker: Path) -> type:
    class Exploit:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    return Exploit


def test_a_crafted_checkpoint_that_would_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "payload_ran"
    crafted = tmp_path / "run" / "last.pt"
    crafted.parent.mkdir(parents=True)
    torch.save({"model": {}, "epoch": 1, "rng": _exploit_path(marker)()}, crafted)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(crafted)
    assert str(caught.value).startswith(f"{crafted}: refused") and "\n" not in str(caught.value)
    # ... also when a run resumes from it.
    with pytest.raises(CheckpointError, match="refused"):
        make_loop(tmp_path).fit(resume=True)
    assert not marker.exists()
    # The same file loaded the unsafe way would have run the payload: the test can fail.
    torch.load(crafted, weights_only=False)
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_a_truncated_checkpoint_is_one_line_naming_the_file(tmp_path, keep):
    loop = make_loop(tmp_path, ToyTask(scores=[0.3]), epochs=1)
    loop.fit()
    last = tmp_path / "run" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError) as caught:
        make_loop(tmp_path, epochs=2).fit(resume=True)
    message = str(caught.value)
    assert message.startswith(f"{last}: damaged or truncated") and "\n" not in message


def test_a_checkpoint_of_another_model_does_not_fit(tmp_path):
    last = tmp_path / "run" / "last.pt"
    make_loop(tmp_path, ToyTask(scores=[0.3]), epochs=1).fit()
    state = torch.load(last, weights_only=True)
    state["model"] = {"weight": torch.zeros(3, 3)}
    torch.save(state, last)
    with pytest.raises(CheckpointError, match=r"last\.pt: does not fit this run"):
        make_loop(tmp_path, epochs=2).fit(resume=True)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_next_start_removes_temporary_files_of_an_interrupted_write(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    stale = folder / f".last.pt.tmp-{_dead_pid()}"
    stale.write_bytes(b"PK\x03\x04" + b"\0" * 4096)  # what a SIGKILL in torch.save leaves
    unrelated = folder / ".notes.txt"
    unrelated.write_text("keep me")
    make_loop(tmp_path, ToyTask(scores=[0.3]), epochs=1).fit()
    assert not stale.exists() and unrelated.exists()
    assert sorted(p.name for p in folder.iterdir()) == [".notes.txt", "best.pt", "last.pt", "metrics.jsonl"]


def test_remove_stale_temp_files_keeps_this_process_own_and_complete_files(tmp_path):
    import os

    own = tmp_path / f".last.pt.tmp-{os.getpid()}"
    own.write_bytes(b"in progress")
    other = tmp_path / ".config.json.tmp-12"
    other.write_text("{")
    atomic_torch_save({"x": torch.ones(1)}, tmp_path / "best.pt")
    assert remove_stale_temp_files(tmp_path) == [other]
    assert own.exists() and (tmp_path / "best.pt").exists()
    assert remove_stale_temp_files(tmp_path / "absent") == []


def test_no_torch_load_in_the_package_without_weights_only():
    """Every torch.load call in src/ passes weights_only=True (a literal)."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id == "torch":
                    keywords = {k.arg: k.value for k in node.keywords}
                    value = keywords.get("weights_only")
                    if not (isinstance(value, ast.Constant) and value.value is True):
                        offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert offenders == []


# ------------------------------------------------------------------------ TensorBoard


class Interrupt(Exception):
    pass


class StopAtEpoch(SilentProgress):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def start(self, description: str, total: int) -> None:
        if f" epoch {self.epoch}/" in description:
            raise Interrupt(description)


def test_tensorboard_scalars_equal_the_metrics_lines_also_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    scores = [0.2, 0.4, 0.3, 0.5]
    loop = make_loop(tmp_path, ToyTask(scores=scores), board=True, epochs=4)
    loop.progress = StopAtEpoch(3)
    with pytest.raises(Interrupt):
        loop.fit()
    # An interrupted run that had written epoch 3's events would leave duplicates; fake that.
    stale = tensorboard_module.TensorBoardLog(tmp_path / "run" / "tensorboard")
    stale.write({"train_loss": 123.0, "val_score": -1.0}, 3)
    stale.close()
    resumed = make_loop(tmp_path, ToyTask(scores=scores[2:]), board=True, epochs=4)
    resumed.fit(resume=True)

    lines = metric_lines(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    scalars = tensorboard_module.read_scalars(tmp_path / "run" / "tensorboard")
    expected_tags = {tag for tag, _ in tensorboard_module.flatten_scalars(lines[0])}
    assert {"train_loss", "lr", "val_score", "val_dict/a", "val_dict/b", "skipped_steps"} <= expected_tags
    assert set(scalars) == expected_tags
    for tag, series in scalars.items():
        assert [step for step, _ in series] == [1, 2, 3, 4], tag
        from_lines = [dict(tensorboard_module.flatten_scalars(r))[tag] for r in lines]
        np.testing.assert_allclose([v for _, v in series], from_lines, rtol=1e-6, err_msg=tag)


def test_without_tensorboard_nothing_changes_and_one_info_line_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setattr(tensorboard_module, "_missing_reported", False)
    with caplog.at_level(logging.DEBUG, logger="lungopacity"):
        make_loop(tmp_path / "a", ToyTask(scores=[0.1]), board=True, epochs=1).fit()
        make_loop(tmp_path / "b", ToyTask(scores=[0.1]), board=True, epochs=1).fit()
    notes = [r for r in caplog.records if "tensorboard" in r.getMessage()]
    assert [(r.levelno, r.name) for r in notes] == [(logging.INFO, "lungopacity.engine.tensorboard")]
    assert not (tmp_path / "a" / "run" / "tensorboard").exists()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_loop_module_documents_the_checkpoint_keys():
    for key in loop_module.STATE_KEYS:
        assert key in loop_module.__doc__


# --------------------------------------------------------------- the weight average


class TinyNorm(torch.nn.Module):
    """One weight, and BatchNorm's float and integer buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(1))
        self.norm = torch.nn.BatchNorm1d(1)


def test_weight_average_follows_its_warm_up_and_decay_exactly():
    model = TinyNorm()
    average = loop_module.WeightAverage(model, decay=0.5)
    trained = [4.0, 2.0, 8.0, -1.0, 3.0, 5.0, 7.0, 1.0, 6.0, 2.0, 9.0]
    expected = 0.0  # the copy starts at the model's weights
    for step, value in enumerate(trained):
        with torch.no_grad():
            model.scale.fill_(value)
            model.norm.running_mean.fill_(2 * value)
            model.norm.num_batches_tracked.fill_(step + 1)
        average.update(model)
        # By hand: d = min(0.5, (1 + t) / (10 + t)); the first steps move most of the way.
        d = min(0.5, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * value
        assert average.module.scale.item() == pytest.approx(expected, abs=1e-6)
        assert average.module.norm.running_mean.item() == pytest.approx(2 * expected, abs=1e-5)
        assert average.module.norm.num_batches_tracked.item() == step + 1  # copied, not averaged
    assert average.decay_at(0) == pytest.approx(0.1) and average.decay_at(8) == 0.5 and average.decay_at(100) == 0.5
    assert not average.module.scale.requires_grad and not average.module.training
    assert model.scale.item() == 9.0  # the trained weights are never touched
    restored = loop_module.WeightAverage(TinyNorm(), decay=0.5)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == len(trained) and restored.module.scale.item() == average.module.scale.item()


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_weight_average_refuses_a_decay_outside_0_1(decay):
    with pytest.raises(loop_module.ConfigError, match="--ema"):
        loop_module.WeightAverage(TinyNorm(), decay=decay)


def test_with_a_weight_average_the_epochs_evaluate_it_and_best_pt_keeps_it(tmp_path):
    task = ToyTask(scores=[0.1, 0.9, 0.2])
    loop = make_loop(tmp_path, task, epochs=3, patience=5, ema_decay=0.9, max_steps_per_epoch=3)
    result = loop.fit()
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert result.best_epoch == 2 and best["epoch"] == 2
    # What epoch 2 evaluated (its payload) is the average, and best.pt holds it.
    assert torch.equal(best["model"]["weight"], result.best_payload)
    # last.pt: the raw weights to train on from, and the average beside them after 9 updates.
    assert last["ema"]["updates"] == 9
    assert torch.equal(last["model"]["weight"], loop.model.weight.detach())
    assert torch.equal(last["ema"]["model"]["weight"], loop.evaluated_model.weight.detach())
    assert not torch.equal(last["model"]["weight"], last["ema"]["model"]["weight"])
    assert result.model is loop.evaluated_model
    # Loading last.pt for inference gives the average, not the raw weights.
    assert torch.equal(loop_module.evaluated_weights(last)["weight"], last["ema"]["model"]["weight"])
    model, _ = loop_module.load_best_model(tmp_path / "run" / "last.pt", lambda config: ToyNet())
    assert torch.equal(model.weight.detach(), last["ema"]["model"]["weight"])
    # Without an average, last.pt's model is what it evaluated.
    make_loop(tmp_path / "plain", ToyTask(scores=[0.1]), epochs=1).fit()
    plain = load_checkpoint(tmp_path / "plain" / "run" / "last.pt")
    assert plain["ema"] is None and loop_module.evaluated_weights(plain) is plain["model"]


def test_a_resumed_run_continues_the_weight_average_exactly(tmp_path):
    scores = [0.2, 0.4, 0.3, 0.5]
    make_loop(tmp_path / "whole", ToyTask(scores=scores), epochs=4, ema_decay=0.95).fit()
    interrupted = make_loop(tmp_path / "parts", ToyTask(scores=scores), epochs=4, ema_decay=0.95)
    interrupted.progress = StopAtEpoch(3)
    with pytest.raises(Interrupt):
        interrupted.fit()
    make_loop(tmp_path / "parts", ToyTask(scores=scores[2:]), epochs=4, ema_decay=0.95).fit(resume=True)
    whole = load_checkpoint(tmp_path / "whole" / "run" / "last.pt")
    parts = load_checkpoint(tmp_path / "parts" / "run" / "last.pt")
    assert parts["ema"]["updates"] == whole["ema"]["updates"] == 8
    for key in ("weight", "bias"):
        assert torch.equal(parts["ema"]["model"][key], whole["ema"]["model"][key]), key
        assert torch.equal(parts["model"][key], whole["model"][key]), key


def test_resuming_with_a_weight_average_from_a_run_without_one_is_one_line(tmp_path):
    make_loop(tmp_path, ToyTask(scores=[0.3]), epochs=1).fit()
    with pytest.raises(CheckpointError) as caught:
        make_loop(tmp_path, epochs=2, ema_decay=0.9).fit(resume=True)
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "run" / "last.pt")) and "weight average" in message
    assert "\n" not in message
