"""The whole pipeline shape offline: Optuna sweep with k-fold trials, refit, final training, benchmark.

A tiny BERT token classifier (built from a config in code, nothing downloaded) on
synthetic NER-like data, on CPU, in well under two minutes:

    hpo_sweep -- hpo_trial (x3) -- hpo_trial_fold (x2 each)
              '- hpo_refit (the best trial, on all training data)
    (each trial carries cv.* over its folds; the sweep leaderboard.csv/.png)
    final_training  (lineage -> the refit, its trial and the sweep)
    benchmarking    (lineage -> the final training run)

Run it with ``python examples/hf_trainer_kfold_hpo.py [--tracking-uri URI]``; by
default runs go to the embedded local store under the current directory
(``./mlruns/mlflow.db``), or to ``MLFLOW_TRACKING_URI`` when set. Needs
``pip install "trainkit-tracking[transformers,optuna,torch]"``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in this example needs the Hub
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import optuna
import torch
import transformers
from optuna.distributions import CategoricalDistribution, FloatDistribution

from trainkit_tracking import Run, RunSpec, Tracker, fingerprint
from trainkit_tracking.integrations.optuna import TrackedStudy
from trainkit_tracking.integrations.transformers import TrackingCallback

MODEL = "tiny-bert"
VOCAB, LABELS, SEQ = 50, 3, 12
FOLDS = 2
SEARCH_SPACE = {
    "learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
    "per_device_train_batch_size": CategoricalDistribution([8, 16]),
}


# Data and model --------------------------------------------------------------------


class TinyNer(torch.utils.data.Dataset):  # type: ignore[misc]
    """Synthetic token classification: the tag of a token is its id modulo 3."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    @classmethod
    def random(cls, n: int, seed: int) -> TinyNer:
        gen = torch.Generator().manual_seed(seed)
        return cls(torch.randint(1, VOCAB, (n, SEQ), generator=gen))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids % LABELS}

    def split(self, fold: int, folds: int) -> tuple[TinyNer, TinyNer]:
        """(train, validation) of fold ``fold`` of ``folds``."""
        mask = torch.arange(len(self)) % folds == fold
        return TinyNer(self.ids[~mask]), TinyNer(self.ids[mask])


def tiny_bert(seed: int = 0) -> transformers.BertForTokenClassification:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ,
        num_labels=LABELS,
    )
    torch.manual_seed(seed)
    return transformers.BertForTokenClassification(config)


def token_accuracy(prediction: Any) -> dict[str, float]:
    predicted = prediction.predictions.argmax(-1)
    return {"accuracy": float((predicted == prediction.label_ids).mean())}


def train(
    run: Run,
    params: dict[str, Any],
    train_data: TinyNer,
    eval_data: TinyNer | None,
    workdir: str,
    *,
    log_model: bool = False,
) -> tuple[dict[str, float], Any]:
    """Fine-tune a fresh tiny BERT with the Trainer, tracked into ``run``: (eval metrics, model)."""
    args = transformers.TrainingArguments(
        output_dir=workdir,
        num_train_epochs=1,
        learning_rate=params["learning_rate"],
        per_device_train_batch_size=params["per_device_train_batch_size"],
        per_device_eval_batch_size=32,
        logging_steps=2,
        eval_strategy="epoch" if eval_data is not None else "no",
        save_strategy="no",
        report_to="none",  # TrackingCallback logs; HF's MLflowCallback must not log twice
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        compute_metrics=token_accuracy,
        callbacks=[TrackingCallback(run, log_model=log_model)],
    )
    trainer.remove_callback(transformers.PrinterCallback)  # the run has the logs
    trainer.train()
    return (trainer.evaluate() if eval_data is not None else {}), trainer.model


# The pipeline ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Run]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else ./mlruns"
    )
    parser.add_argument("--experiment", default="hf-kfold-hpo-example")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--folds", type=int, default=FOLDS)
    options = parser.parse_args(argv)
    folds = options.folds

    transformers.logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tracker = Tracker(options.experiment, options.tracking_uri)
    data, test_data = TinyNer.random(96, seed=0), TinyNer.random(32, seed=1)
    workdir = tempfile.mkdtemp(prefix="trainkit-example-")
    runs: dict[str, Run] = {}

    # 1. HPO: each trial is scored by k-fold CV; folds are children of the trial.
    def objective(trial: optuna.Trial, trial_run: Run) -> float:
        params = dict(trial.params)  # sampled from SEARCH_SPACE before the run was made
        for fold in range(folds):
            with trial_run.child("hpo_trial_fold", fold_idx=fold) as fold_run:
                fold_train, fold_eval = data.split(fold, folds)
                out = os.path.join(workdir, f"t{trial.number}_f{fold}")
                train(fold_run, params, fold_train, fold_eval, out)
        # mean/std/min/max over the folds' last values, read back from the store
        # (folds run in subprocesses would count too), logged on the trial as cv.*
        score: float = trial_run.cv_summary()["cv.eval_accuracy.mean"]
        return score

    study = optuna.create_study(
        study_name="tiny ner", direction="maximize", sampler=optuna.samplers.TPESampler(seed=0)
    )
    with TrackedStudy(
        tracker,
        study,
        model=MODEL,
        search_space=SEARCH_SPACE,
        metric="eval_accuracy",  # the folds' metric: the leaderboard shows its fold spread
        study_settings={"folds": folds, "data": "tiny-ner-v1"},
    ) as tracked:
        tracked.optimize(objective, n_trials=options.trials)
        best = study.best_trial
        runs["sweep"] = tracked.sweep_run

        # 2. Refit the best trial on all training data, under the sweep.
        with tracked.start_refit() as refit_run:
            train(refit_run, dict(best.params), data, test_data, os.path.join(workdir, "refit"))
        runs["refit"] = refit_run

    # 3. Final training, named by what it trains (spec) and how (exec), with lineage.
    training_config = {"model": MODEL, "params": best.params, "data": "tiny-ner-v1", "epochs": 1}
    final_spec = RunSpec(
        kind="final_training",
        model=MODEL,
        spec_fp=fingerprint(training_config),
        exec_fp=fingerprint({"device": "cpu", "torch": torch.__version__.split("+")[0]}),
        lineage=tracker.lineage(refit_run.id),
    )
    with tracker.start_run(final_spec) as final_run:
        metrics, final_model = train(
            final_run,
            dict(best.params),
            data,
            test_data,
            os.path.join(workdir, "final"),
            log_model=True,
        )
        final_run.log_dict(training_config, "training_config.json")
    runs["final_training"] = final_run

    # 4. Benchmark the final model: its lineage points at the final training run.
    batch_size, repeats = 32, 5
    bench_config = {"batch_size": batch_size, "repeats": repeats, "device": "cpu"}
    bench_spec = RunSpec(
        kind="benchmarking",
        model=MODEL,
        study_key_hash=tracked.study_key_hash,
        trial_key_hash=tracked.refit_spec().trial_key_hash,
        benchmark_config_hash=fingerprint(bench_config),
        lineage=tracker.lineage(final_run.id),
    )
    with tracker.start_run(bench_spec) as bench_run:
        model = final_model.eval()
        batch = test_data.ids[:batch_size]
        with torch.no_grad():
            model(input_ids=batch)  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                model(input_ids=batch)
        latency = (time.perf_counter() - start) / repeats
        bench_run.log_params(bench_config)
        bench_run.log_metrics(
            {"latency_ms": latency * 1000, "eval_accuracy": metrics.get("eval_accuracy", 0.0)}
        )
    runs["benchmarking"] = bench_run

    for label, run in runs.items():
        print(f"{label:15} {run.id}  {run.name}")
    return runs


if __name__ == "__main__":
    main()
