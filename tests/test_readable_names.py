"""The default policy's names (SPEC section 18): the first 18 characters tell siblings apart
on a realistic tree; the seed's policy on demand (NamingPolicy.seed(), TRAINKIT_NAMING_POLICY)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from trainkit_tracking import (
    NamingPolicy,
    PolicyError,
    RunSpec,
    Tracker,
    fingerprint,
    training_id,
)
from trainkit_tracking.cli import cli
from trainkit_tracking.testing import TrainkitStore

# What MLflow's run list shows of a name at 1600 px.
SHOWN = 18
MODEL = "dbmdz/bert-large-cased-finetuned-conll03-english"
STUDY = "350a79aa9c1e4b2f" * 4
TRIAL = "7c1d02ab55e0f3a1" * 4


def spec(kind: str, **fields: Any) -> RunSpec:
    return RunSpec(kind=kind, model=MODEL, environment="local", **fields)


GOLDEN = [
    (spec("hpo_sweep", study_key_hash=STUDY, study_name="ner search"), 2, "sweep_2 350a79aa_nersearch dbmdz_bert_large_cased_finetuned_conll03_english"),
    (spec("hpo_trial", study_key_hash=STUDY, trial_number=5), 1, "t05_1 dbmdz_bert_large_cased_finetuned_conll03_english study-350a79aa"),
    (spec("hpo_trial_fold", study_key_hash=STUDY, trial_number=5, fold_idx=1), None, "t05 fold1 dbmdz_bert_large_cased_finetuned_conll03_english study-350a79aa"),
    (spec("hpo_refit", study_key_hash=STUDY, trial_key_hash=TRIAL, trial_number=5), 1, "refit t05_1 dbmdz_bert_large_cased_finetuned_conll03_english study-350a79aa trial-7c1d02ab"),
    (spec("final_training", spec_fp="abc123de45", exec_fp="0f9e8d7c6b", variant=2), None, "final abc123de v2 dbmdz_bert_large_cased_finetuned_conll03_english exec-0f9e8d7c"),
    (spec("benchmarking", study_key_hash=STUDY, trial_key_hash=TRIAL, benchmark_config_hash="be9c4a1f00"), 1, "bench_1 be9c4a1f dbmdz_bert_large_cased_finetuned_conll03_english study-350a79aa trial-7c1d02ab"),
    (spec("conversion", conv_fp="c0ffee1234", parent_training_id=training_id("abc123de45", "0f9e8d7c6b", 2)), None, "conv c0ffee12 abc123de v2 dbmdz_bert_large_cased_finetuned_conll03_english exec-0f9e8d7c"),
]  # fmt: skip


@pytest.mark.parametrize(("run_spec", "version", "expected"), GOLDEN)
def test_default_policy_golden_names(run_spec: RunSpec, version: int | None, expected: str) -> None:
    assert NamingPolicy.default().render(run_spec, version=version) == expected


def test_default_fallback_and_versions() -> None:
    policy = NamingPolicy.default()
    bare = spec("final_training")
    assert (
        policy.render(bare, run_id="0f3a9c1e" * 4)
        == f"final 0f3a9c1e {MODEL.replace('/', '_').replace('-', '_')}"
    )
    versioned = {s.kind.value for s, *_ in GOLDEN if policy.is_versioned(s)}
    assert versioned == {"hpo_sweep", "hpo_trial", "hpo_refit", "benchmarking"}


def _tree(tracker: Tracker) -> dict[str, list[tuple[str, str]]]:
    """A realistic experiment: two studies (one swept twice), 3 trials x 3 folds each, a
    refit, two final trainings, two benchmarks and two conversions of one long-named model;
    returns {parent id or 'top': [(kind, name)]}."""
    created: dict[str, list[tuple[str, str]]] = defaultdict(list)

    def note(run: Any, kind: str, parent: str = "top") -> Any:
        created[parent].append((kind, run.name))
        return run

    for study, study_name in (
        (STUDY, "ner search"),
        (STUDY, "ner search"),
        ("9d8c7b6a" * 8, "ner lr"),
    ):
        with tracker.start_run(
            spec("hpo_sweep", study_key_hash=study, study_name=study_name)
        ) as sweep:
            note(sweep, "sweep")
            for number in range(3):
                trial_key = fingerprint({"study": study, "n": number})
                with sweep.child(
                    "hpo_trial", trial_number=number, trial_key_hash=trial_key
                ) as trial:
                    note(trial, "trial", sweep.id)
                    for fold in range(3):
                        with trial.child("hpo_trial_fold", fold_idx=fold) as fold_run:
                            note(fold_run, "fold", trial.id)
            with sweep.child("hpo_refit", trial_number=2, trial_key_hash=TRIAL) as refit:
                note(refit, "refit", sweep.id)
    refit_id = refit.id
    finals = []
    for variant in (1, 2):
        final_spec = spec(
            "final_training",
            spec_fp="abc123de45",
            exec_fp="0f9e8d7c6b",
            variant=variant,
            lineage=tracker.lineage(refit_id),
        )
        with tracker.start_run(final_spec) as final:
            finals.append(note(final, "final"))
    for config in ("be9c4a1f00", "77aa00bb11"):
        with tracker.start_run(
            spec(
                "benchmarking", benchmark_config_hash=config, lineage=tracker.lineage(finals[0].id)
            )
        ) as bench:
            note(bench, "bench")
    for conv in ("c0ffee1234", "deadbeef56"):
        parent = training_id("abc123de45", "0f9e8d7c6b", 1)
        with tracker.start_run(
            spec(
                "conversion",
                conv_fp=conv,
                parent_training_id=parent,
                lineage=tracker.lineage(finals[0].id),
            )
        ) as conversion:
            note(conversion, "conversion")
    return created  # fmt: skip


def test_first_18_characters_tell_siblings_apart(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("names-18")
    created = _tree(tracker)
    assert sum(len(runs) for runs in created.values()) == 3 + 3 * 3 * 4 + 3 + 2 + 2 + 2
    for parent, runs in created.items():
        shown = [name[:SHOWN] for _, name in runs]
        assert len(set(shown)) == len(shown), (parent, shown)
        assert all(len(name) > SHOWN for _, name in runs)  # the long model comes after
    top = dict(created["top"])
    assert {kind for kind, _ in created["top"]} == {"sweep", "final", "bench", "conversion"}
    assert top["final"].startswith("final ") and top["bench"].startswith("bench_")
    # The environment is a tag, not a part of the name; the full hashes are tags too.
    run = MlflowClient(trainkit_store.uri).search_runs(
        [tracker.experiment_id], "attributes.run_name LIKE 'sweep_2 %'"
    )[0]
    assert run.data.tags["code.env"] == "local" and "local" not in run.info.run_name
    assert run.data.tags["code.study_key_hash"] == STUDY


def test_18_characters_were_not_enough_with_the_seed_policy() -> None:
    # The seed's names of the same kinds: the 18 characters MLflow shows are all alike.
    seed = NamingPolicy.seed()
    assert len({seed.render(s, version=v)[:SHOWN] for s, v, _ in GOLDEN}) == 1


# The seed's policy on demand ----------------------------------------------------------

TRIAL_SPEC = spec("hpo_trial", study_key_hash=STUDY, trial_number=5)
SEED_TRIAL = "local_dbmdz_bert_large_cased_finetuned_conll03_english_hpo_trial_study-350a79aa_t05_1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("seed", SEED_TRIAL),
        ("SEED", SEED_TRIAL),
        ("default", GOLDEN[1][2]),
        ("", GOLDEN[1][2]),
    ],
)
def test_naming_policy_variable_selects_the_policy(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    monkeypatch.setenv("TRAINKIT_NAMING_POLICY", value)
    with Tracker("by-variable").start_run(TRIAL_SPEC) as run:
        assert run.name == expected
    # An explicit policy= wins over the variable.
    assert Tracker("x", policy=NamingPolicy.default()).policy == NamingPolicy.default()


def test_naming_policy_variable_takes_a_file(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = trainkit_store.root / "naming.yaml"
    path.write_text(
        'extends: seed\nkinds:\n  hpo_trial:\n    pattern: "{model}_t{trial_number}{version}"\n'
    )
    monkeypatch.setenv("TRAINKIT_NAMING_POLICY", str(path))
    tracker = Tracker("by-file")
    assert tracker.policy.kinds["hpo_sweep"] == NamingPolicy.seed().kinds["hpo_sweep"]
    with tracker.start_run(TRIAL_SPEC) as run:
        assert run.name == "dbmdz_bert_large_cased_finetuned_conll03_english_t05_1"


@pytest.mark.parametrize(
    ("value", "needles"),
    [
        ("sed", ["TRAINKIT_NAMING_POLICY='sed'", "did you mean 'seed'?", "'default', 'seed'"]),
        ("namng.yaml", ["file 'namng.yaml' does not exist", "did you mean 'naming.yaml'"]),
        ("{not json", ["TRAINKIT_NAMING_POLICY", "not json"]),
        ("bad.yaml", ["TRAINKIT_NAMING_POLICY", "bad.yaml", "unknown placeholder {oops}"]),
    ],
)
def test_a_bad_naming_policy_variable_says_what_to_do(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch, value: str, needles: list[str]
) -> None:
    (trainkit_store.root / "naming.yaml").write_text("extends: default\nkinds: {}\n")
    (trainkit_store.root / "bad.yaml").write_text(
        "extends: seed\nkinds:\n  hpo_trial:\n    pattern: '{oops}'\n"
    )
    monkeypatch.setenv("TRAINKIT_NAMING_POLICY", value)
    with pytest.raises(PolicyError) as info:
        Tracker("bad")  # when the Tracker is built, not at the first run
    for needle in needles:
        assert needle in str(info.value)


def test_subprocesses_name_runs_with_the_parents_policy(trainkit_store: TrainkitStore) -> None:
    custom = NamingPolicy.from_dict(
        {
            "extends": "seed",
            "kinds": {"hpo_trial_fold": {"pattern": "f{fold_idx} of t{trial_number}"}},
        }
    )
    for policy, fold_name in (
        (NamingPolicy.seed(), SEED_TRIAL[:-2] + "_fold1"),
        (custom, "f1 of t05"),
    ):
        tracker = Tracker("handover", policy=policy)
        with tracker.start_run(TRIAL_SPEC) as trial:
            env = trial.subprocess_env({}, child=TRIAL_SPEC.child("hpo_trial_fold", fold_idx=1))
            value = env["TRAINKIT_NAMING_POLICY"]
            if policy == custom:  # a policy of its own travels as JSON, never as a path
                assert NamingPolicy.from_dict(json.loads(value)) == custom
            else:
                assert value == "seed"
            # What a training subprocess does: a Tracker from the environment attaches.
            with Tracker.from_env(env).attach() as fold:
                assert fold.name == fold_name  # fmt: skip


def test_extends_seed_keeps_the_seeds_patterns() -> None:
    policy = NamingPolicy.from_dict(
        {"extends": "seed", "kinds": {"hpo_trial": {"pattern": "{model}{version}"}}}
    )
    assert policy.kinds["hpo_sweep"] == NamingPolicy.seed().kinds["hpo_sweep"]
    with pytest.raises(PolicyError, match="did you mean 'seed'"):
        NamingPolicy.from_dict({"extends": "seeds", "kinds": {}})  # fmt: skip


def test_cli_name_and_policy_show_seed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    args = [
        "name",
        "-k",
        "hpo_trial",
        "-m",
        MODEL,
        "--study-key-hash",
        STUDY,
        "--trial-number",
        "5",
        "--env",
        "local",
    ]
    assert CliRunner().invoke(cli, args).output.strip() == GOLDEN[1][2][:3] + GOLDEN[1][2][5:]
    monkeypatch.setenv("TRAINKIT_NAMING_POLICY", "seed")
    assert CliRunner().invoke(cli, args).output.strip() == SEED_TRIAL[:-2]
    assert CliRunner().invoke(cli, [*args, "--policy", "default"]).output.strip().startswith("t05 ")
    done = CliRunner().invoke(cli, ["policy", "show", "--seed"])
    shown = tmp_path / "seed.yaml"
    shown.write_text(done.stdout)
    assert NamingPolicy.from_yaml(shown) == NamingPolicy.seed()
    missing = CliRunner().invoke(cli, [*args, "--policy", str(tmp_path / "sed.yaml")])
    assert missing.exit_code == 2 and "did you mean" in missing.output and "seed.yaml" in missing.output  # fmt: skip


def test_doctor_shows_the_naming_policy_and_a_bad_variable(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINKIT_NAMING_POLICY", "seed")
    shown = CliRunner().invoke(cli, ["doctor"])
    assert "naming policy   seed (TRAINKIT_NAMING_POLICY)" in shown.stdout
    monkeypatch.setenv("TRAINKIT_NAMING_POLICY", "sed")
    bad = CliRunner().invoke(cli, ["doctor"])
    assert bad.exit_code == 1  # a problem, reported with the rest: not a crash
    assert "problem: environment variable TRAINKIT_NAMING_POLICY='sed'" in bad.stdout
    assert "did you mean 'seed'?" in bad.stdout and "tracking URI    sqlite:" in bad.stdout
