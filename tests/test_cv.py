"""Cross-validation summaries and sweep leaderboards, computed from what a real store holds."""

from __future__ import annotations

import csv
import logging
import math
import re
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from trainkit_tracking import Run, RunSpec, Tracker, TrackingError
from trainkit_tracking._insight.cv_stats import select_folds, stats, summarize
from trainkit_tracking._store.store import RunRecord
from trainkit_tracking.cli import render_tree
from trainkit_tracking.testing import TrainkitStore

STUDY = "350a79aa9c1e"
FOLD_KEY = "code.hpo.fold_idx"


def record(run_id: str, fold: int | None, status: str, **metrics: float) -> RunRecord:
    tags = {} if fold is None else {FOLD_KEY: str(fold)}
    return RunRecord(
        run_id=run_id,
        experiment_id="1",
        name=run_id,
        status=status,
        start_time=int(run_id[-1]),
        end_time=None,
        tags=tags,
        metrics=metrics,
    )


def sweep_spec() -> RunSpec:
    return RunSpec(kind="hpo_sweep", model="m", environment="local", study_key_hash=STUDY)


def metrics_of(uri: str, run_id: str) -> dict[str, float]:
    return dict(MlflowClient(uri).get_run(run_id).data.metrics)


# The statistics -----------------------------------------------------------------------


def test_summary_of_known_values_is_exact() -> None:
    folds = [
        record("r1", 0, "FINISHED", f1=0.5, loss=2.0),
        record("r2", 1, "FINISHED", f1=0.7, loss=1.0),
        record("r3", 2, "FINISHED", f1=0.9),
        record("r4", 3, "FAILED", f1=100.0),  # excluded, counted as not finished
        record("r5", 4, "RUNNING", f1=100.0),  # did not finish either
    ]
    summary = summarize(folds, patterns=("*",))  # every metric, as cv_metrics=["*"] asks
    assert summary == {
        "cv.n_folds": 3.0,
        "cv.n_failed": 2.0,
        "cv.f1.mean": statistics.fmean([0.5, 0.7, 0.9]),
        "cv.f1.std": statistics.stdev([0.5, 0.7, 0.9]),
        "cv.f1.min": 0.5,
        "cv.f1.max": 0.9,
        "cv.loss.mean": 1.5,
        "cv.loss.std": statistics.stdev([2.0, 1.0]),
        "cv.loss.min": 1.0,
        "cv.loss.max": 2.0,
    }
    assert summary["cv.f1.std"] == pytest.approx(0.2)


def test_one_fold_has_std_zero_and_nan_propagates() -> None:
    one = summarize([record("r1", 0, "FINISHED", f1=0.25)], study_metric="f1")
    assert (one["cv.f1.mean"], one["cv.f1.std"], one["cv.n_folds"]) == (0.25, 0.0, 1.0)
    with_nan = stats([1.0, float("nan")])
    assert all(math.isnan(v) for v in (with_nan.mean, with_nan.std, with_nan.min, with_nan.max))
    with pytest.raises(ValueError):
        stats([])


def test_a_fold_run_again_counts_once_with_its_newest_finished_run() -> None:
    folds = [
        record("r1", 0, "FAILED", f1=0.0),
        record("r2", 0, "FINISHED", f1=0.6),  # the retry of fold 0
        record("r3", 1, "FINISHED", f1=0.1),
        record("r4", 1, "FINISHED", f1=0.8),  # fold 1 again, newer: it wins
    ]
    chosen, failed = select_folds(folds, FOLD_KEY)
    assert [r.run_id for r in chosen] == ["r2", "r4"] and failed == 0
    assert summarize(folds, study_metric="f1")["cv.f1.mean"] == pytest.approx(0.7)


# From the store -----------------------------------------------------------------------


def test_trial_end_logs_the_summary_of_its_finished_folds(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("cv")
    sweep = tracker.start_run(sweep_spec())
    sweep.set_tags({"code.hpo.metric": "f1"})  # the study's metric, as TrackedStudy tags it
    sweep.flush()
    trial = sweep.child("hpo_trial", trial_number=0)
    values = {0: 0.61, 1: 0.72, 2: 0.83}
    for k, value in values.items():
        with trial.child("hpo_trial_fold", fold_idx=k) as fold:
            fold.log_metric("f1", value - 0.5, step=0)
            fold.log_metric("f1", value, step=1)  # the last value is the one that counts
            fold.log_metric("epoch", 3)
    with pytest.raises(RuntimeError), trial.child("hpo_trial_fold", fold_idx=3) as bad:
        bad.log_metric("f1", 99.0)
        raise RuntimeError("fold 3 crashed")
    returned = trial.cv_summary()  # callable before the end, e.g. to return from an objective
    trial.end()
    sweep.end()

    stored = metrics_of(trainkit_store.uri, trial.id)
    expected = list(values.values())
    assert returned["cv.f1.mean"] == statistics.fmean(expected)
    assert stored["cv.f1.mean"] == pytest.approx(statistics.fmean(expected), abs=1e-15)
    assert stored["cv.f1.std"] == pytest.approx(statistics.stdev(expected), abs=1e-15)
    assert (stored["cv.f1.min"], stored["cv.f1.max"]) == (0.61, 0.83)
    assert "cv.epoch.mean" not in stored  # a counter, not a result: not summarised
    assert (stored["cv.n_folds"], stored["cv.n_failed"]) == (3.0, 1.0)
    # Runs without fold children get no cv.* metrics.
    assert not any(k.startswith("cv.") for k in metrics_of(trainkit_store.uri, sweep.id))


def test_folds_made_by_subprocesses_count(trainkit_store: TrainkitStore, tmp_path: Path) -> None:
    tracker = Tracker("cv-sub")
    with (
        tracker.start_run(sweep_spec()) as sweep,
        sweep.child("hpo_trial", trial_number=4) as trial,
    ):
        script = textwrap.dedent(
            """
            import sys
            from trainkit_tracking import Tracker
            with Tracker.from_env().attach() as fold:
                fold.log_metric("eval_acc", float(sys.argv[1]))
            """
        )
        for k, value in ((0, 0.5), (1, 0.75)):
            assert trial.spec is not None
            env = trial.subprocess_env(child=trial.spec.child("hpo_trial_fold", fold_idx=k))
            done = subprocess.run(
                [sys.executable, "-c", script, str(value)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
        with trial.child("hpo_trial_fold", fold_idx=2) as fold:
            fold.log_metric("eval_acc", 1.0)
    stored = metrics_of(trainkit_store.uri, trial.id)
    assert stored["cv.n_folds"] == 3.0 and stored["cv.n_failed"] == 0.0
    assert stored["cv.eval_acc.mean"] == pytest.approx(0.75)
    assert (stored["cv.eval_acc.min"], stored["cv.eval_acc.max"]) == (0.5, 1.0)


def test_a_failing_summary_never_stops_the_end(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    tracker = Tracker("cv-broken")
    sweep = tracker.start_run(sweep_spec())
    trial = sweep.child("hpo_trial", trial_number=0)
    trial.child("hpo_trial_fold", fold_idx=0).end()

    def broken(*args: Any, **kwargs: Any) -> list[RunRecord]:
        raise OSError("store went away")

    monkeypatch.setattr(tracker.store, "search", broken)
    with caplog.at_level(logging.WARNING, logger="trainkit_tracking._insight.cv"):
        assert trial.end() is True
        assert sweep.end() is True
    client = MlflowClient(trainkit_store.uri)
    assert client.get_run(trial.id).info.status == "FINISHED"
    assert client.get_run(sweep.id).info.status == "FINISHED"
    messages = [r.getMessage() for r in caplog.records]
    assert any("cross-validation summary" in m and "store went away" in m for m in messages)
    assert any("leaderboard" in m and "store went away" in m for m in messages)


def test_interrupted_runs_skip_the_summary(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("cv-killed")
    with tracker.start_run(sweep_spec()) as sweep:
        trial = sweep.child("hpo_trial", trial_number=0)
        with trial.child("hpo_trial_fold", fold_idx=0) as fold:
            fold.log_metric("f1", 0.5)
        trial.end("KILLED")
    assert not any(k.startswith("cv.") for k in metrics_of(trainkit_store.uri, trial.id))


# The leaderboard ----------------------------------------------------------------------

FOLD_F1 = {0: [0.6, 0.7, 0.8], 1: [0.2, 0.4, 0.3], 2: [0.9, 0.95, 1.0]}


def build_sweep(tracker: Tracker, *, metric_tag: bool = True) -> tuple[Run, dict[int, Run]]:
    """Three trials with three folds each, a fourth that failed after one fold."""
    sweep = tracker.start_run(sweep_spec())
    sweep.log_params({"study_direction": "MAXIMIZE"})
    if metric_tag:
        sweep.set_tags({"code.hpo.metric": "f1"})
        sweep.flush()
    trials: dict[int, Run] = {}
    for number, scores in FOLD_F1.items():
        trial = sweep.child("hpo_trial", trial_number=number)
        trial.log_params({"lr": 10.0**-number, "opt": "adam"})
        for k, score in enumerate(scores):
            with trial.child("hpo_trial_fold", fold_idx=k) as fold:
                fold.log_metrics({"f1": score, "val_loss": 1 - score})
        trial.log_metric("f1", statistics.fmean(scores))
        trial.end()
        trials[number] = trial
    failed = sweep.child("hpo_trial", trial_number=3)
    failed.log_params({"lr": 1e-9, "opt": "sgd"})
    with failed.child("hpo_trial_fold", fold_idx=0) as fold:
        fold.log_metrics({"f1": 0.1, "val_loss": 0.9})
    failed.child("hpo_trial_fold", fold_idx=1).end("FAILED")
    failed.end("FAILED")
    trials[3] = failed
    return sweep, trials


def download(uri: str, run_id: str, path: str, dest: Path) -> Path:
    return Path(MlflowClient(uri).download_artifacts(run_id, path, str(dest)))


def test_leaderboard_csv_has_a_row_per_trial(trainkit_store: TrainkitStore, tmp_path: Path) -> None:
    tracker = Tracker("board")
    sweep, trials = build_sweep(tracker)
    sweep.end()
    local = download(trainkit_store.uri, sweep.id, "leaderboard.csv", tmp_path / "dl")
    with local.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:3] == ["trial", "status", "score"]  # what a reader looks for first
    assert [int(r["trial"]) for r in rows] == [0, 1, 2, 3]
    for row in rows:
        number = int(row["trial"])
        trial = trials[number]
        assert row["run_id"] == trial.id and row["run_name"] == trial.name
        assert row["params.lr"] == str(10.0**-number if number < 3 else 1e-9)
        assert row["score_metric"] == "f1"
        scores = FOLD_F1.get(number, [0.1])
        assert float(row["cv.f1.mean"]) == statistics.fmean(scores)
        assert float(row["score"]) == statistics.fmean(scores)
        assert int(row["score_n"]) == len(scores)
    assert [r["status"] for r in rows] == ["FINISHED", "FINISHED", "FINISHED", "FAILED"]
    assert float(rows[0]["cv.f1.std"]) == pytest.approx(0.1)
    assert float(rows[1]["cv.val_loss.mean"]) == pytest.approx(0.7)
    assert float(rows[0]["f1"]) == pytest.approx(0.7)  # the trial's own metric
    assert (rows[3]["cv.n_folds"], rows[3]["cv.n_failed"], rows[3]["cv.f1.std"]) == ("1", "1", "0")
    assert rows[3]["params.opt"] == "sgd" and rows[3]["pruned"] == "false"


def test_leaderboard_png_with_matplotlib(trainkit_store: TrainkitStore, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.image

    tracker = Tracker("board-png")
    sweep, _ = build_sweep(tracker)
    sweep.end()
    files = {a.path for a in MlflowClient(trainkit_store.uri).list_artifacts(sweep.id)}
    assert files == {"leaderboard.csv", "leaderboard.png"}
    png = download(trainkit_store.uri, sweep.id, "leaderboard.png", tmp_path / "dl")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(png).shape[:2]
    assert width >= 600 and height >= 400


def test_no_png_and_no_error_without_matplotlib(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    tracker = Tracker("board-bare")
    sweep, _ = build_sweep(tracker)
    with caplog.at_level(logging.WARNING):
        sweep.end()
    files = {a.path for a in MlflowClient(trainkit_store.uri).list_artifacts(sweep.id)}
    assert files == {"leaderboard.csv"}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_sweep_without_trials_gets_no_leaderboard(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("board-empty")
    sweep = tracker.start_run(sweep_spec())
    sweep.end()
    assert MlflowClient(trainkit_store.uri).list_artifacts(sweep.id) == []


# The tree -----------------------------------------------------------------------------


def trial_lines(text: str) -> dict[str, str]:
    """Trial (``t00``...) -> what the tree shows after the duration."""
    shown = {}
    for line in text.splitlines()[1:]:
        name = line.lstrip("│├└─|`- ")
        match = re.match(r"(t\d+)_\d+ ", name)
        if match is not None:
            shown[match[1]] = line.split("  ")[-1].strip()
    return shown


def test_tree_shows_mean_std_and_fold_count_of_the_study_metric(
    trainkit_store: TrainkitStore,
) -> None:
    tracker = Tracker("board-tree")
    sweep, _ = build_sweep(tracker)
    sweep.end()
    text = render_tree(trainkit_store.uri, experiment_id=tracker.experiment_id)
    # The sweep names f1 as its metric: it wins over val_loss of the generic list.
    assert trial_lines(text) == {
        "t00": "f1=0.7 ± 0.1 (3 folds)",
        "t01": "f1=0.3 ± 0.1 (3 folds)",
        "t02": "f1=0.95 ± 0.05 (3 folds)",
        "t03": "f1=0.1 ± 0 (1 fold)",
    }
    fold_line = next(line for line in text.splitlines() if "t00 fold0 " in line)
    assert fold_line.endswith("  f1=0.6")  # fold rows show the study metric too
    ascii_text = render_tree(trainkit_store.uri, experiment_id=tracker.experiment_id, ascii=True)
    assert trial_lines(ascii_text)["t00"] == "f1=0.7 +- 0.1 (3 folds)"
    asked = render_tree(trainkit_store.uri, experiment_id=tracker.experiment_id, metric="val_loss")
    assert trial_lines(asked)["t01"] == "val_loss=0.7 ± 0.1 (3 folds)"


def test_tree_without_a_study_metric_uses_the_generic_list(
    trainkit_store: TrainkitStore,
) -> None:
    tracker = Tracker("board-tree-generic")
    sweep, _ = build_sweep(tracker, metric_tag=False)
    sweep.end()
    text = render_tree(trainkit_store.uri, experiment_id=tracker.experiment_id)
    assert trial_lines(text)["t02"] == "val_loss=0.05 ± 0.05 (3 folds)"


def test_other_ranks_summarise_nothing(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")
    tracker = Tracker("cv-rank1")
    trial = tracker.start_run(
        RunSpec(kind="hpo_trial", model="m", study_key_hash=STUDY, trial_number=0)
    )
    trial.child("hpo_trial_fold", fold_idx=0).end()
    assert trial.cv_summary() == {}
    trial.end()
    assert MlflowClient(trainkit_store.uri).search_runs([tracker.experiment_id]) == []


# What a summary covers (SPEC section 18) ----------------------------------------------

# What the HF Trainer logs into a fold run (train and evaluate), and a system sample.
TRAINER_FOLD = {
    "loss": 0.9, "learning_rate": 5e-5, "grad_norm": 1.2, "epoch": 3.0,
    "train_loss": 0.8, "train_runtime": 12.0, "train_samples_per_second": 80.0,
    "train_steps_per_second": 5.0, "total_flos": 1e12,
    "eval_loss": 0.5, "eval_f1": 0.8, "eval_precision": 0.75,
    "eval_runtime": 1.5, "eval_samples_per_second": 200.0, "eval_steps_per_second": 12.0,
    "test_f1": 0.78, "system/cpu_percent": 50.0,
}  # fmt: skip


def trainer_sweep(tracker: Tracker, folds: int = 3) -> tuple[Run, Run]:
    sweep = tracker.start_run(sweep_spec())
    sweep.set_tags({"code.hpo.metric": "eval_f1"})
    sweep.log_params({"study_direction": "MAXIMIZE"})
    sweep.flush()
    trial = sweep.child("hpo_trial", trial_number=0)
    trial.log_params({f"p{i}": i for i in range(3)})
    for k in range(folds):
        with trial.child("hpo_trial_fold", fold_idx=k) as fold:
            fold.log_metrics({key: value + k / 100 for key, value in TRAINER_FOLD.items()})
    trial.log_metric("eval_f1", 0.81)
    trial.end()
    return sweep, trial


def test_summary_of_trainer_folds_is_the_study_and_evaluation_metrics(
    trainkit_store: TrainkitStore, tmp_path: Path
) -> None:
    sweep, trial = trainer_sweep(Tracker("cv-trainer"))
    sweep.end()
    cv = {k for k in metrics_of(trainkit_store.uri, trial.id) if k.startswith("cv.")}
    summarised = {"eval_f1", "eval_loss", "eval_precision", "test_f1"}
    stats_keys = {f"cv.{m}.{s}" for m in summarised for s in ("mean", "std", "min", "max")}
    assert cv == stats_keys | {"cv.n_folds", "cv.n_failed"}
    local = download(trainkit_store.uri, sweep.id, "leaderboard.csv", tmp_path / "dl")
    with local.open(encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle))
    assert header[:3] == ["trial", "status", "score"]
    assert header == [
        "trial", "status", "score", "score_std", "score_n", "score_metric", "pruned",
        "run_name", "run_id", "params.p0", "params.p1", "params.p2", "eval_f1",
        "cv.n_folds", "cv.n_failed", "cv.eval_f1.mean", "cv.eval_f1.std", "cv.eval_loss.mean",
        "cv.eval_loss.std", "cv.eval_precision.mean", "cv.eval_precision.std",
        "cv.test_f1.mean", "cv.test_f1.std",
    ]  # fmt: skip
    # The tree still shows the study's metric over the folds.
    text = render_tree(trainkit_store.uri, experiment_id=sweep.experiment_id)
    assert trial_lines(text)["t00"] == "eval_f1=0.81 ± 0.01 (3 folds)"


def test_cv_metrics_chooses_what_is_summarised(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("cv-chosen", cv_metrics=["loss", "eval_*"])
    _, trial = trainer_sweep(tracker, folds=2)
    cv = {
        k.rsplit(".", 1)[0] for k in metrics_of(trainkit_store.uri, trial.id) if k.count(".") == 2
    }
    evals = {k for k in TRAINER_FOLD if k.startswith("eval_")}
    assert cv == {f"cv.{m}" for m in {"loss", *evals}}
    everything = Tracker("cv-all", cv_metrics=["*"])
    _, every = trainer_sweep(everything, folds=2)
    assert "cv.epoch.mean" in metrics_of(trainkit_store.uri, every.id)
    assert "cv.system/cpu_percent.mean" not in metrics_of(trainkit_store.uri, every.id)
    # Subprocesses summarise what their parent's tracker summarises.
    with everything.start_run(sweep_spec()) as sweep:
        assert sweep.subprocess_env({})["TRAINKIT_CV_METRICS"] == "*"


@pytest.mark.parametrize(
    ("value", "error", "needle"),
    [
        ("f1", TypeError, "list of metric names or patterns"),
        (["f1", 3], TypeError, "must be str"),
        (["f1,eval_loss"], ValueError, "'f1,eval_loss'"),
        ([""], ValueError, "not a metric name"),
    ],
)
def test_bad_cv_metrics_are_refused_when_the_tracker_is_built(
    value: Any, error: type[Exception], needle: str
) -> None:
    with pytest.raises(error, match=re.escape(needle)):
        Tracker("x", cv_metrics=value)


def test_cv_metrics_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINKIT_CV_METRICS", "f1, eval_*")
    assert Tracker("x").cv_metrics == ("f1", "eval_*")
    monkeypatch.setenv("TRAINKIT_CV_METRICS", "f1;loss")
    with pytest.raises(TrackingError, match="TRAINKIT_CV_METRICS"):
        Tracker("x")
