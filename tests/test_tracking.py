"""--report_to: TensorBoard event files mirror metrics.jsonl (read back with TensorBoard's own reader),
the flags become hparams, wandb is refused clearly when missing and fed the same records when present."""
from __future__ import annotations

import math
import sys
import types

import pytest

from common.errors import ConfigError
from common.io import read_jsonl_log
from cs224n_files import keyword_sentiment, write_sentiment


def classifier_run(tmp_path, tokenizer_dir, *extra):
    import classifier

    files = []
    for split, n, test in (("train", 24, False), ("dev", 8, False), ("test", 4, True)):
        path = write_sentiment(tmp_path / f"cfimdb-{split}.csv", keyword_sentiment(n, 7 + n, 2), test=test)
        files += [f"--cfimdb_{split}", str(path)]
    return classifier.main(["--model_size", "tiny", "--no_progress", "--batch_size", "2", "--tokenizer",
                            str(tokenizer_dir), "--datasets", "cfimdb", "--fine-tune-mode", "full-model",
                            "--epochs", "2", "--lr", "1e-3", "--predictions_dir", str(tmp_path / "pred"),
                            "--run_dir", str(tmp_path / "run"), *files, *extra])


def read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_and_hparams_match_the_metrics_log(tmp_path, tokenizer_dir):
    classifier_run(tmp_path, tokenizer_dir, "--report_to", "tensorboard")
    sub = tmp_path / "run" / "cfimdb"
    records = read_jsonl_log(sub / "metrics.jsonl")
    steps = [r for r in records if r["event"] == "step"]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert len(steps) >= 2 and len(epochs) == 2
    acc = read_events(sub)
    assert not list((tmp_path / "run").glob("events.out.tfevents*"))  # the root log got no record: no file
    tags = acc.Tags()["scalars"]
    assert {"step/train_loss", "step/lr", "epoch/train_loss", "dev/accuracy", "dev/f1", "hparam/accuracy"} <= set(tags)
    got = [(e.step, e.value) for e in acc.Scalars("step/train_loss")]
    assert [s for s, _ in got] == [r["step"] for r in steps]
    assert all(math.isclose(v, r["train_loss"], rel_tol=1e-6) for (_, v), r in zip(got, steps))
    dev = [(e.step, e.value) for e in acc.Scalars("dev/accuracy")]
    assert dev == [(r["epoch"], pytest.approx(r["dev"]["accuracy"])) for r in epochs]
    done = [r for r in records if r["event"] == "done"][0]
    assert acc.Scalars("hparam/accuracy")[0].value == pytest.approx(done["best"]["accuracy"])
    # the hparams plugin's session start holds the run's flags
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    start = [plugin_data_pb2.HParamsPluginData.FromString(v) for v in content.values()]
    session = [d.session_start_info for d in start if d.HasField("session_start_info")][0]
    assert session.hparams["lr"].number_value == pytest.approx(1e-3)
    assert session.hparams["fine-tune-mode"].string_value == "full-model"
    assert "report_to" not in session.hparams  # resume-free flags are not settings of the run


def test_report_to_none_writes_no_event_files(tmp_path, tokenizer_dir):
    classifier_run(tmp_path, tokenizer_dir, "--epochs", "1")
    assert not list((tmp_path / "run").rglob("events.out.tfevents*"))


def test_report_to_wandb_without_the_package_is_a_clear_error(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match="wandb is not installed: pip install wandb"):
        classifier_run(tmp_path, tokenizer_dir, "--epochs", "1", "--report_to", "wandb")


def test_report_to_bad_value_names_the_flag(tmp_path, tokenizer_dir, capsys):
    import classifier
    from training.cli import entry_point

    with pytest.raises(SystemExit):
        entry_point(classifier.main)(["--report_to", "mlflow"])
    assert "--report_to" in capsys.readouterr().err


class FakeRun:
    def __init__(self):
        self.logged, self.summary, self.defined, self.finished = [], {}, [], False

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))

    def log(self, data):
        self.logged.append(data)

    def finish(self):
        self.finished = True


def test_wandb_sink_is_offline_and_gets_steps_epochs_and_best(tmp_path, monkeypatch):
    from training.tracking import WandbSink

    fake = types.SimpleNamespace(run=None, inits=[])

    def init(**kwargs):
        fake.inits.append(kwargs)
        fake.run = FakeRun()
        return fake.run

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    sink = WandbSink(tmp_path, "run-1", {"--lr": 0.001, "--limit": None})
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    assert fake.inits[0]["config"] == {"lr": 0.001, "limit": "None"}
    sink.write("step", {"event": "step", "time": 1.0, "epoch": 1, "step": 10, "batch": 10, "lr": 0.5, "train_loss": 2.0})
    sink.write("epoch", {"event": "epoch", "epoch": 1, "train_loss": 1.5, "dev": {"accuracy": 0.75}, "mfu": None})
    sink.write("done", {"event": "done", "best": {"accuracy": 0.75}, "best_epoch": 1})
    assert fake.run.logged == [{"optimizer_step": 10, "step/lr": 0.5, "step/train_loss": 2.0},
                               {"epoch": 1, "epoch/train_loss": 1.5, "dev/accuracy": 0.75}]
    assert fake.run.summary == {"best/accuracy": 0.75}
    sink.close()
    assert fake.run.finished
