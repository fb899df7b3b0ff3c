"""TrackingCallback with a real Trainer: a tiny BERT built in code, a few CPU steps, a real store."""

from __future__ import annotations

import os
import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from trainkit_tracking import RunSpec, Tracker, TrackingWarning
from trainkit_tracking.testing import TrainkitStore

# HF_HUB_OFFLINE=1 is set for the whole session by conftest.pytest_configure.
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")

from trainkit_tracking.integrations.transformers import TrackingCallback  # noqa: E402

VOCAB, LABELS, SEQ = 50, 3, 12


class TinyNer(torch.utils.data.Dataset):  # type: ignore[misc]
    """Token classification where the label is the token id modulo 3."""

    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=gen)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids % LABELS}


def tiny_bert() -> Any:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ,
        num_labels=LABELS,
    )
    torch.manual_seed(0)
    return transformers.BertForTokenClassification(config)


def make_trainer(tmp_path: Path, callback: TrackingCallback, **arg_changes: Any) -> Any:
    fields: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 4,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "logging_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "learning_rate": 1e-3,
        "hub_token": "hf_dontleakme123",
    }
    fields.update(arg_changes)
    args = transformers.TrainingArguments(**fields)
    return transformers.Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=TinyNer(32),
        eval_dataset=TinyNer(16, seed=1),
        callbacks=[callback],
    )


def spec() -> RunSpec:
    return RunSpec(kind="final_training", model="tiny-bert", environment="local")


def test_metrics_params_and_model_land_in_the_run(
    trainkit_store: TrainkitStore, tmp_path: Path
) -> None:
    tracker = Tracker("hf")
    with tracker.start_run(spec()) as run:
        trainer = make_trainer(tmp_path, TrackingCallback(run, log_model=True))
        trainer.train()
    client = MlflowClient(trainkit_store.uri)
    data = client.get_run(run.id)
    params, metrics = data.data.params, data.data.metrics
    assert data.info.status == "FINISHED"
    # TrainingArguments, unprefixed; model config under model_config.
    assert params["learning_rate"] == "0.001"
    assert params["max_steps"] == "4"
    assert params["model_config.hidden_size"] == "16"
    assert params["model_config.vocab_size"] == str(VOCAB)
    assert params["model_config.id2label.0"] == "LABEL_0"
    assert params["hub_token"] == "***"
    assert "hf_dontleakme123" not in str(params)
    assert all(value != "None" for value in params.values())
    # Training loss once per step, eval twice, with the Trainer's global step.
    loss = client.get_metric_history(run.id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4]
    evals = client.get_metric_history(run.id, "eval_loss")
    assert sorted(m.step for m in evals) == [2, 4]
    assert "train_runtime" in metrics and "epoch" in metrics
    # The final model, loadable from the artifact.
    files = {f.path for f in client.list_artifacts(run.id, "model")}
    assert "model/config.json" in files
    local = client.download_artifacts(run.id, "model", str(tmp_path / "dl"))
    reloaded = transformers.BertForTokenClassification.from_pretrained(local)
    assert reloaded.config.hidden_size == 16


def test_a_long_argument_is_cut_once_with_one_warning(
    trainkit_store: TrainkitStore, tmp_path: Path
) -> None:
    tracker = Tracker("hf")
    with tracker.start_run(spec()) as run:
        trainer = make_trainer(tmp_path, TrackingCallback(run), run_name="r" * 7000)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
    cuts = [str(w.message) for w in caught if "'run_name' is" in str(w.message)]
    assert len(cuts) == 1 and "at most 6000" in cuts[0]
    params = MlflowClient(trainkit_store.uri).get_run(run.id).data.params
    assert params["run_name"] == "r" * 5997 + "..."


def test_checkpoints_are_uploaded(trainkit_store: TrainkitStore, tmp_path: Path) -> None:
    tracker = Tracker("hf")
    with tracker.start_run(spec()) as run:
        callback = TrackingCallback(run, log_checkpoints=True, params=False)
        trainer = make_trainer(
            tmp_path, callback, save_strategy="steps", save_steps=2, eval_strategy="no"
        )
        trainer.train()
    client = MlflowClient(trainkit_store.uri)
    names = {f.path for f in client.list_artifacts(run.id, "checkpoints")}
    assert names == {"checkpoints/checkpoint-2", "checkpoints/checkpoint-4"}
    inside = {f.path for f in client.list_artifacts(run.id, "checkpoints/checkpoint-4")}
    assert "checkpoints/checkpoint-4/config.json" in inside
    assert client.get_run(run.id).data.params == {}  # params=False


def test_only_world_process_zero_logs(trainkit_store: TrainkitStore, tmp_path: Path) -> None:
    tracker = Tracker("hf")
    run = tracker.start_run(spec())
    callback = TrackingCallback(run)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state = transformers.TrainerState(is_world_process_zero=False, global_step=3)
    control = transformers.TrainerControl()
    callback.on_train_begin(args, state, control, model=tiny_bert())
    callback.on_log(args, state, control, logs={"loss": 0.5})
    state.is_world_process_zero = True
    callback.on_log(args, state, control, logs={"loss": 0.25, "note": "text", "flag": True})
    run.end()
    data = MlflowClient(trainkit_store.uri).get_run(run.id).data
    assert data.params == {}
    assert data.metrics == {"loss": 0.25}


def test_report_to_mlflow_warns(trainkit_store: TrainkitStore, tmp_path: Path) -> None:
    run = Tracker("hf").start_run(spec())
    callback = TrackingCallback(run, params=False)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=["mlflow"])
    state = transformers.TrainerState(is_world_process_zero=True)
    with pytest.warns(TrackingWarning, match='report_to="none"'):
        callback.on_train_begin(args, state, transformers.TrainerControl())
    run.end()


def test_rejects_something_that_is_not_a_run() -> None:
    with pytest.raises(TypeError, match="Run"):
        TrackingCallback("not a run")  # type: ignore[arg-type]


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer_kfold_hpo.py"


@pytest.mark.slow
def test_example_pipeline_builds_the_whole_tree(
    trainkit_store: TrainkitStore, tmp_path: Path
) -> None:
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": trainkit_store.uri, "HF_HUB_OFFLINE": "1"}
    workdir = tmp_path / "work"  # the test store lives in tmp_path/mlruns
    workdir.mkdir()
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--experiment", "pipeline"],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    printed = {
        line.split()[0]: line.split()[1] for line in done.stdout.splitlines() if line.strip()
    }
    assert set(printed) == {"sweep", "refit", "final_training", "benchmarking"}
    # The test store was used, not the default one (artifacts still land in ./mlruns).
    assert not (workdir / "mlruns" / "mlflow.db").exists()

    client = MlflowClient(trainkit_store.uri)
    experiment = client.get_experiment_by_name("pipeline")
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    kinds: dict[str, list[Any]] = {}
    for r in runs.values():
        kinds.setdefault(r.data.tags["code.run_kind"], []).append(r)
    assert {k: len(v) for k, v in kinds.items()} == {
        "hpo_sweep": 1,
        "hpo_trial": 3,
        "hpo_trial_fold": 6,
        "hpo_refit": 1,
        "final_training": 1,
        "benchmarking": 1,
    }
    assert all(r.info.status == "FINISHED" for r in runs.values())
    sweep_id = printed["sweep"]
    trial_ids = {r.info.run_id for r in kinds["hpo_trial"]}
    assert all(r.data.tags["mlflow.parentRunId"] == sweep_id for r in kinds["hpo_trial"])
    assert all(r.data.tags["mlflow.parentRunId"] in trial_ids for r in kinds["hpo_trial_fold"])
    refit = runs[printed["refit"]]
    assert refit.data.tags["mlflow.parentRunId"] == sweep_id
    sweep_tags = runs[sweep_id].data.tags
    best_trial = sweep_tags["best_trial_run_id"]
    assert best_trial in trial_ids
    # Folds of every trial carry the Trainer's metrics and params.
    fold = kinds["hpo_trial_fold"][0]
    assert "eval_accuracy" in fold.data.metrics and "learning_rate" in fold.data.params
    # The callback's per-fold eval metrics are summarised on each trial, which returned
    # their mean to Optuna (logged as the study metric).
    for trial in kinds["hpo_trial"]:
        folds = [
            f
            for f in kinds["hpo_trial_fold"]
            if f.data.tags["mlflow.parentRunId"] == trial.info.run_id
        ]
        scores = [f.data.metrics["eval_accuracy"] for f in folds]
        assert trial.data.metrics["cv.n_folds"] == len(scores) == 2
        assert trial.data.metrics["cv.eval_accuracy.mean"] == pytest.approx(sum(scores) / 2)
        assert trial.data.metrics["eval_accuracy"] == trial.data.metrics["cv.eval_accuracy.mean"]
        assert "cv.eval_loss.std" in trial.data.metrics
    board = {"leaderboard.csv"} | ({"leaderboard.png"} if find_spec("matplotlib") else set())
    assert board <= {a.path for a in client.list_artifacts(sweep_id)}

    final = runs[printed["final_training"]]
    assert "mlflow.parentRunId" not in final.data.tags
    assert final.data.tags["code.lineage.hpo_refit_run_id"] == refit.info.run_id
    assert final.data.tags["code.lineage.hpo_sweep_run_id"] == sweep_id
    assert final.data.tags["code.lineage.hpo_trial_run_id"] == best_trial
    assert (
        final.data.tags["code.trial_key_hash"] == runs[best_trial].data.tags["code.trial_key_hash"]
    )
    assert "model/config.json" in {
        f.path for f in client.list_artifacts(final.info.run_id, "model")
    }

    bench = runs[printed["benchmarking"]]
    assert "mlflow.parentRunId" not in bench.data.tags
    assert bench.data.tags["code.lineage.parent_training_run_id"] == final.info.run_id
    assert bench.data.tags["code.lineage.parent_kind"] == "final_training"
    assert bench.data.metrics["latency_ms"] > 0
