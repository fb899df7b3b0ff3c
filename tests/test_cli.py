"""The trainkit-tracking CLI against real sqlite stores, in-process and as real subprocesses."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from mlflow import MlflowClient

from trainkit_tracking import NamingPolicy, RunSpec, Tracker
from trainkit_tracking._cli.common import parse_duration
from trainkit_tracking._journal.run_logger import pending
from trainkit_tracking._store.store import Store
from trainkit_tracking.cli import cli, render_tree
from trainkit_tracking.testing import TrainkitStore

STUDY = "350a79aa9c1e4b2f"
DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "docs" / "default-policy.yaml"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def error_line(result: Result) -> str:
    """The single line a failing command wrote to stderr (and no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert lines[0].startswith("error: ")
    return lines[0]


def run_cli(
    *args: str, env: dict[str, str] | None = None, script: bool = False, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the real command line: the console script, or ``python -m trainkit_tracking``."""
    if script:
        found = Path(sys.executable).with_name("trainkit-tracking")
        command = [str(found) if found.exists() else str(shutil.which("trainkit-tracking"))]
    else:
        command = [sys.executable, "-m", "trainkit_tracking"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# --help, the script, the module -------------------------------------------------------


@pytest.mark.parametrize(
    "args", [[], ["doctor"], ["name"], ["tree"], ["sync"], ["reap"], ["policy", "check"]]
)
def test_help_does_not_import_mlflow(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "trainkit_tracking", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
    assert not [m for m in imported if m.split(".")[0] in ("mlflow", "torch", "azureml")]
    assert "trainkit_tracking.cli" in imported  # the check above looked at real import lines


def test_script_and_module_print_the_same_name() -> None:
    args = ["name", "--kind", "hpo_trial", "--model", "distilbert", "--env", "local"]
    args += ["--study-key-hash", STUDY, "--trial-number", "5"]
    expected = "t05 distilbert study-350a79aa\n"
    for script in (True, False):
        done = run_cli(*args, script=script)
        assert (done.returncode, done.stdout, done.stderr) == (0, expected, "")
    version = run_cli("--version", script=True)
    assert version.returncode == 0 and "0." in version.stdout


def test_usage_errors_are_one_line_exit_2() -> None:
    for args in (["nope"], ["reap"], ["name", "--kind", "bogus", "--model", "m"]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert "see '" in error_line(result)


# doctor -------------------------------------------------------------------------------


def test_doctor_ok(trainkit_store: TrainkitStore) -> None:
    Tracker("doc-exp").setup()
    result = invoke("doctor", "--experiment", "doc-exp")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"{trainkit_store.uri}  (from MLFLOW_TRACKING_URI)" in out
    assert re.search(r"experiment\s+doc-exp \(id \d+\)", out)
    assert re.search(r"mlflow\s+3\.\d+", out)
    assert re.search(r"store\s+answers", out)
    assert re.search(r"platform\s+local", out)
    assert "0 pending records" in out
    assert out.rstrip().endswith("no problems found")


def test_doctor_without_experiment_or_store_yet_is_fine(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = trainkit_store.root / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    result = invoke("doctor")
    assert result.exit_code == 0, result.output
    assert "from default: the embedded local store" in result.stdout
    assert f"not created yet ({elsewhere.resolve()}/mlruns/mlflow.db)" in result.stdout
    assert "(not set: pass --experiment" in result.stdout
    assert not (elsewhere / "mlruns").exists()  # doctor creates nothing


def test_doctor_unreachable_store_exits_1_quickly_with_secrets_masked(closed_port: int) -> None:
    uri = f"http://alice:hunter2pw@127.0.0.1:{closed_port}/"
    env = {"MLFLOW_TRACKING_PASSWORD": "s3cr3t-value", "MLFLOW_TRACKING_USERNAME": "alice"}
    started = time.monotonic()
    done = run_cli("doctor", "--tracking-uri", uri, "--timeout", "5s", env=env)
    assert time.monotonic() - started < 30
    assert done.returncode == 1, done.stdout + done.stderr
    assert "hunter2pw" not in done.stdout + done.stderr
    assert "s3cr3t-value" not in done.stdout + done.stderr
    assert f"http://***@127.0.0.1:{closed_port}/" in done.stdout
    assert "MLFLOW_TRACKING_PASSWORD=***" in done.stdout
    assert "MLFLOW_TRACKING_USERNAME=alice" in done.stdout
    assert re.search(r"store\s+does not answer", done.stdout)
    assert "problem: the tracking store" in done.stdout
    assert "Traceback" not in done.stderr


def test_doctor_store_that_hangs_is_bounded(silent_port: int) -> None:
    started = time.monotonic()
    done = run_cli("doctor", "--tracking-uri", f"http://127.0.0.1:{silent_port}", "--timeout", "2s")
    assert time.monotonic() - started < 30
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"did not answer .*within 2\.\d s", done.stdout), done.stdout


def test_doctor_flags_an_unusable_azure_uri(trainkit_store: TrainkitStore) -> None:
    result = invoke("doctor", "--tracking-uri", "azureml://example.invalid/workspace")
    assert result.exit_code == 1, result.output
    assert "problem: Azure ML was configured but is not usable" in result.stdout
    assert "(from default: the embedded local store)" in result.stdout


def test_store_commands_fail_fast_on_a_closed_port(closed_port: int) -> None:
    started = time.monotonic()
    result = invoke("tree", "-e", "x", "--tracking-uri", f"http://u:pw@127.0.0.1:{closed_port}")
    assert time.monotonic() - started < 10
    assert result.exit_code == 1
    line = error_line(result)
    assert "cannot be reached" in line and "pw" not in line


def test_doctor_counts_pending_spool_records(trainkit_store: TrainkitStore) -> None:
    write_dead_spool(trainkit_store, make_run(trainkit_store))
    result = invoke("doctor")
    assert result.exit_code == 0, result.output  # a warning, not a problem
    assert "2 pending records" in result.stdout
    assert "trainkit-tracking sync" in result.stdout


# name ---------------------------------------------------------------------------------

GOLDEN = [
    (
        f"--kind hpo_trial --study-key-hash {STUDY} --trial-number 5",
        "t05 distilbert study-350a79aa",
    ),
    (
        f"-k hpo_trial_fold --study-key-hash {STUDY} --trial-number 5 --fold-idx 1",
        "t05 fold1 distilbert study-350a79aa",
    ),
    (
        f"--kind hpo_sweep --study-key-hash {STUDY} --study-name 'ner/v2 study'",
        "sweep 350a79aa_ner-v2study distilbert",
    ),
    (
        f"--kind hpo_refit --study-key-hash {STUDY} --trial-number 12 --trial-key-hash 7c1d02ab55",
        "refit t12 distilbert study-350a79aa trial-7c1d02ab",
    ),
    (
        "--kind final_training --spec-fp abc123de99 --exec-fp xyz789ab00 --variant 2 "
        "--model distilbert-base-uncased",
        "final abc123de v2 distilbert_base_uncased exec-xyz789ab",
    ),
    (
        "--kind final_training --run-id 4634a675293f420d8f6ae72fc55778c6",
        "final 4634a675 distilbert",
    ),
    ("--kind final_training", "final unknown distilbert"),
    (
        f"--kind benchmarking --study-key-hash {STUDY} --trial-key-hash 7c1d02ab55 "
        "--benchmark-config-hash be9c4a1f00",
        "bench be9c4a1f distilbert study-350a79aa trial-7c1d02ab",
    ),
    (
        "--kind conversion --conv-fp c0ffee1234 "
        "--parent-training-id spec_ABC123DE99_exec_0f9e8d7c6b/v3",
        "conv c0ffee12 abc123de v3 distilbert exec-0f9e8d7c",
    ),
    # The seed's policy names runs by their storage env.
    (
        f"--kind hpo_trial --study-key-hash {STUDY} --trial-number 0 "
        "--env azureml --storage-env colab --policy seed",
        "colab_distilbert_hpo_trial_study-350a79aa_t00",
    ),
]


@pytest.mark.parametrize(("args", "expected"), GOLDEN)
def test_name_golden(args: str, expected: str) -> None:
    base = ["name", "--model", "distilbert", "--env", "local"]
    result = invoke(*base, *shlex.split(args))
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"


def test_name_agrees_with_the_library() -> None:
    spec = RunSpec(kind="hpo_trial", model="bert large", study_key_hash=STUDY, trial_number=3)
    result = invoke(
        "name", "-k", "hpo_trial", "-m", "bert large", "--study-key-hash", STUDY,
        "--trial-number", "3",
    )  # fmt: skip
    assert result.stdout.strip() == NamingPolicy.default().base_name(spec)


def test_name_with_a_policy_file(tmp_path: Path) -> None:
    data = NamingPolicy.default().to_dict()
    data["kinds"]["hpo_trial"]["pattern"] = "{model}-trial{trial_number}-{study_hash}{version}"
    path = tmp_path / "naming.yaml"
    path.write_text(yaml.safe_dump(data))
    result = invoke(
        "name", "-k", "hpo_trial", "-m", "bert", "--study-key-hash", STUDY, "--trial-number",
        "7", "--policy", str(path),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == "bert-trial07-350a79aa\n"


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["-k", "hpo_trial"], ["--study-key-hash", "--trial-number"]),
        (["-k", "hpo_trial_fold", "--study-key-hash", "s", "--trial-number", "1"], ["--fold-idx"]),
        (["-k", "conversion", "--conv-fp", "c"], ["--parent-training-id"]),
        (["-k", "hpo_trial", "--study-key-hash", "s", "--trial-number", "-1"], ["--trial-number"]),
        (["-k", "final_training", "--variant", "0"], ["--variant"]),
        (["-k", "final_training", "--env", "lo cal"], ["--env"]),
        (
            ["-k", "conversion", "--conv-fp", "c", "--parent-training-id", "v2"],
            ["parent_training_id"],
        ),
        (["-k", "final_training", "--model", "a:b"], ["':'"]),
        (["-k", "hpo_trial", "--study-key-hash", "s", "--trial-number", "x"], ["--trial-number"]),
    ],
)
def test_name_invalid_spec_exits_2_naming_the_field(args: list[str], names: list[str]) -> None:
    result = invoke("name", "--model", "m", *args)
    assert result.exit_code == 2, result.output
    line = error_line(result)
    for field in names:
        assert field in line
    assert result.stdout == ""


# tree ---------------------------------------------------------------------------------

LINE = re.compile(
    r"^(?P<tree>[│├└─ ]*)(?P<name>\S+(?: \S+)*)\s+(?P<status>[A-Z]+)"
    r"\s+(?P<dur>[\d.]+[smhd][\d]*[smh]?)(?:\s+(?P<metric>\S.*))?$"
)


def build_pipeline(tracker: Tracker) -> dict[str, Any]:
    sweep = tracker.start_run(
        RunSpec(kind="hpo_sweep", model="distilbert", environment="local", study_key_hash=STUDY)
    )
    runs: dict[str, Any] = {"sweep": sweep}
    for number in (0, 1):
        trial = sweep.child("hpo_trial", trial_number=number)
        for fold in (0, 1):
            run = trial.child("hpo_trial_fold", fold_idx=fold)
            run.log_metrics({"val_loss": 0.5 - 0.1 * fold - 0.01 * number, "loss": 9.0})
            run.end()
        trial.log_metrics({"val_loss": 0.4 + number, "accuracy": 0.9})
        trial.end("FAILED" if number == 1 else "FINISHED")
        runs[f"trial{number}"] = trial
    refit = sweep.child("hpo_refit", trial_number=0, trial_key_hash="7c1d02ab55")
    refit.log_metrics({"loss": 0.125})
    refit.end()
    sweep.end()
    final_spec = RunSpec(
        kind="final_training",
        model="distilbert",
        environment="local",
        spec_fp="abc1234567",
        exec_fp="def4567890",
        lineage=tracker.lineage(refit.id),
    )
    final = tracker.start_run(final_spec)
    final.log_metrics({"eval_loss": 0.25})
    final.end()
    runs.update(refit=refit, final=final)
    return runs


def parse(text: str) -> list[dict[str, str | None]]:
    rows = []
    for line in text.splitlines()[1:]:
        match = LINE.match(line)
        assert match is not None, line
        rows.append(match.groupdict())
    return rows


def test_tree_of_a_real_pipeline(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("tree-exp")
    runs = build_pipeline(tracker)
    text = render_tree(trainkit_store.uri, experiment_id=tracker.experiment_id)
    assert text.splitlines()[0] == f"experiment 'tree-exp' (id {tracker.experiment_id}): 9 runs"
    rows = parse(text)
    study = "distilbert study-350a79aa"
    assert [(r["tree"], r["name"], r["status"], r["metric"]) for r in rows] == [
        ("", "sweep_1 350a79aa distilbert", "FINISHED", None),
        ("├── ", f"t00_1 {study}", "FINISHED", "val_loss=0.45 ± 0.071 (2 folds)"),
        ("│   ├── ", f"t00 fold0 {study}", "FINISHED", "val_loss=0.5"),
        ("│   └── ", f"t00 fold1 {study}", "FINISHED", "val_loss=0.4"),
        ("├── ", f"t01_1 {study}", "FAILED", "val_loss=0.44 ± 0.071 (2 folds)"),
        ("│   ├── ", f"t01 fold0 {study}", "FINISHED", "val_loss=0.49"),
        ("│   └── ", f"t01 fold1 {study}", "FINISHED", "val_loss=0.39"),
        ("└── ", f"refit t00_1 {study} trial-7c1d02ab", "FINISHED", "loss=0.125"),
        ("", "final abc12345 v1 distilbert exec-def45678", "FINISHED", "eval_loss=0.25"),
    ]  # fmt: skip
    # Columns line up: every status starts at the same offset.
    lines = text.splitlines()[1:]
    offsets = {line.index(row["status"] or "") for line, row in zip(lines, rows, strict=True)}
    assert len(offsets) == 1

    chosen = parse(render_tree(Store(trainkit_store.uri), tracker.experiment_id, metric="accuracy"))
    assert [r["metric"] for r in chosen] == [None, "accuracy=0.9", None, None, "accuracy=0.9"] + [
        None
    ] * 4

    sub = render_tree(trainkit_store.uri, run_id=runs["trial1"].id, ascii=True)
    assert sub.splitlines()[0] == f"run {runs['trial1'].id} in experiment 'tree-exp'"
    assert [line.split()[0] for line in sub.splitlines()[1:]] == ["t01_1", "|--", "`--"]


def test_tree_command(trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = Tracker("tree-cli")
    runs = build_pipeline(tracker)
    result = invoke("tree", "--experiment", "tree-cli")
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n") == render_tree(
        trainkit_store.uri, experiment_id=tracker.experiment_id
    )
    with_ids = invoke("tree", "-e", "tree-cli", "--ids", "--run", runs["sweep"].id)
    assert runs["trial0"].id in with_ids.stdout and runs["final"].id not in with_ids.stdout
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tree-cli")
    assert invoke("tree").stdout == result.stdout


def test_tree_errors(trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch) -> None:
    Tracker("exists").setup()
    missing = invoke("tree", "-e", "nope")
    assert missing.exit_code == 1 and "experiment 'nope' does not exist" in error_line(missing)
    assert invoke("tree").exit_code == 2
    bad_id = invoke("tree", "--run", "not-a-run-id")
    assert bad_id.exit_code == 2 and "--run" in error_line(bad_id)
    no_store = invoke("tree", "-e", "x", "--tracking-uri", "sqlite:////nonexistent/dir/mlflow.db")
    assert no_store.exit_code == 1 and "no tracking store at" in error_line(no_store)
    # An unexpected error: one line without --debug, the traceback with it.
    odd = invoke("tree", "-e", "x", "--tracking-uri", "bogus-scheme://x")
    assert odd.exit_code == 1 and "--debug" in error_line(odd)
    assert "unknown scheme 'bogus-scheme:'" in error_line(odd)
    debug = invoke("--debug", "tree", "-e", "x", "--tracking-uri", "bogus-scheme://x")
    assert debug.exit_code == 1 and debug.exception is not None
    assert "error: " not in debug.output


# reap ---------------------------------------------------------------------------------


def test_parse_duration() -> None:
    assert [parse_duration(d) for d in ("90s", "30m", "2h", "1d", "1h30m", " 2H ")] == [
        90, 1800, 7200, 86400, 5400, 7200,
    ]  # fmt: skip
    for bad in ("", "5", "5x", "0s", "-1h", "1.5h", "h"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def make_run(
    store: TrainkitStore,
    experiment: str = "reap-a",
    *,
    heartbeat_age: float | None = None,
    start_age: float = 0,
) -> str:
    client = MlflowClient(store.uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    tags = (
        {} if heartbeat_age is None else {"code.heartbeat": str(int(time.time() - heartbeat_age))}
    )
    run = client.create_run(
        experiment_id, start_time=int((time.time() - start_age) * 1000), tags=tags
    )
    return str(run.info.run_id)


def status(store: TrainkitStore, run_id: str) -> tuple[str, str | None]:
    run = MlflowClient(store.uri).get_run(run_id)
    return run.info.status, run.data.tags.get("code.interrupted")


def test_reap_ends_only_runs_whose_process_is_gone(trainkit_store: TrainkitStore) -> None:
    old_beat = make_run(trainkit_store, heartbeat_age=3 * 3600, start_age=4 * 3600)
    fresh_beat = make_run(trainkit_store, heartbeat_age=5, start_age=4 * 3600)
    old_start = make_run(trainkit_store, start_age=2 * 3600)
    new_start = make_run(trainkit_store)
    other = make_run(trainkit_store, "reap-b", heartbeat_age=2 * 3600)
    hidden = make_run(trainkit_store, ".trainkit-internal", heartbeat_age=9 * 3600)
    with Tracker("reap-a").start_run(RunSpec(kind="final_training", model="m")) as live:
        live.log_metric("loss", 1.0)
        live.flush()

        dry = invoke("reap", "--older-than", "1h", "--dry-run", "-e", "reap-a")
        assert dry.exit_code == 0, dry.output
        assert {old_beat, old_start} == set(re.findall(r"would end ([0-9a-f]{32})", dry.stdout))
        assert "2 of 5 running runs would end as KILLED (dry run" in dry.stdout
        assert status(trainkit_store, old_beat) == ("RUNNING", None)

        scoped = invoke("reap", "--older-than", "1h", "--experiment", "reap-a")
        assert scoped.exit_code == 0, scoped.output
        assert "2 of 5 running runs ended as KILLED" in scoped.stdout
        assert "judged by its heartbeat" in scoped.stdout
        assert "judged by its start time" in scoped.stdout
        for run_id in (old_beat, old_start):
            assert status(trainkit_store, run_id) == ("KILLED", "true")
        for run_id in (fresh_beat, new_start, live.id, other, hidden):
            assert status(trainkit_store, run_id) == ("RUNNING", None)

        everywhere = invoke("reap", "--older-than", "90m")  # every experiment but hidden ones
        assert everywhere.exit_code == 0, everywhere.output
        assert status(trainkit_store, other) == ("KILLED", "true")
        assert status(trainkit_store, hidden) == ("RUNNING", None)
        assert status(trainkit_store, live.id) == ("RUNNING", None)
    assert status(trainkit_store, live.id) == ("FINISHED", None)
    # A reaped run ends when it was last seen alive, not now.
    killed = MlflowClient(trainkit_store.uri).get_run(old_beat).info
    assert killed.end_time < (time.time() - 2 * 3600) * 1000


def test_reap_bad_input(trainkit_store: TrainkitStore) -> None:
    bad = invoke("reap", "--older-than", "soon")
    assert bad.exit_code == 2 and "90s, 30m, 2h or 1d" in error_line(bad)
    make_run(trainkit_store)
    missing = invoke("reap", "--older-than", "1h", "-e", "nope")
    assert missing.exit_code == 1 and "does not exist" in error_line(missing)
    short = invoke("reap", "--older-than", "10s", "--dry-run")
    assert short.exit_code == 0 and "warning: live runs refresh" in short.stderr


# policy check -------------------------------------------------------------------------


def test_policy_check_good_files(tmp_path: Path) -> None:
    result = invoke("policy", "check", str(DEFAULT_POLICY))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ok: {DEFAULT_POLICY} is a valid naming policy")
    fold = "t05 fold1 distilbert_base_uncased study-350a79aa"
    assert re.search(rf"hpo_trial_fold\s+{fold}\n", result.stdout)
    assert "final_training (fallback)" in result.stdout
    custom = tmp_path / "p.yaml"
    data = NamingPolicy.default().to_dict()
    del data["kinds"]["final_training"]["fallback"]
    custom.write_text(yaml.safe_dump(data))
    assert invoke("policy", "check", str(custom)).exit_code == 0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["kinds"]["hpo_sweep"].update(pattern="{env}_{bogus}"), "{bogus}"),
        (lambda d: d["kinds"].pop("conversion"), "'conversion' has no pattern"),
        (lambda d: d["kinds"]["hpo_trial"].update(pattern="{env}:{model}{version}"), "':'"),
        (lambda d: d["kinds"]["hpo_trial"].update(pattern="{env}_{model"), "hpo_trial"),
        (lambda d: d.update(version=2), "version 2"),
    ],
)
def test_policy_check_bad_files_exit_1(tmp_path: Path, edit: Any, message: str) -> None:
    data = NamingPolicy.default().to_dict()
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = invoke("policy", "check", str(path))
    assert result.exit_code == 1, result.output
    assert message in error_line(result)


def test_policy_check_unreadable_input(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("kinds: [unclosed\n")
    result = invoke("policy", "check", str(broken))
    assert result.exit_code == 1 and "not valid YAML" in error_line(result)
    missing = invoke("policy", "check", str(tmp_path / "nope.yaml"))
    assert missing.exit_code == 2 and "does not exist" in error_line(missing)


# sync ---------------------------------------------------------------------------------

DEAD_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from trainkit_tracking._journal.spool import SpoolWriter
    spool, uri, run_id = sys.argv[1:4]
    ts = int(time.time() * 1000)
    writer = SpoolWriter(Path(spool), uri, run_id)
    writer.append([
        {"t": "b", "n": 1, "m": [["loss", 0.5, ts, 0], ["loss", 0.25, ts, 1]], "p": {"lr": "0.1"}},
        {"t": "e", "n": 2, "status": "FINISHED", "end": ts},
    ])
    writer.sync_to_disk()
    os._exit(0)  # dies without closing: the kernel drops its lock, the records stay spooled
    """
)


def write_dead_spool(store: TrainkitStore, run_id: str) -> Path:
    spool = store.root / "spool"
    done = subprocess.run(
        [sys.executable, "-c", DEAD_WRITER, str(spool), store.uri, run_id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return spool


def test_sync_sends_a_dead_process_spool_exactly_once(trainkit_store: TrainkitStore) -> None:
    run_id = make_run(trainkit_store)
    spool = write_dead_spool(trainkit_store, run_id)
    assert pending(spool) == 2

    dry = invoke("sync", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would send 2 records from 1 spool file: 2 metrics, 1 param" in dry.stdout
    assert "2 records still pending" in dry.stdout
    assert status(trainkit_store, run_id) == ("RUNNING", None)

    done = run_cli("sync", "--spool-dir", str(spool))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sent 2 records from 1 spool file" in done.stdout
    assert "1 run end" in done.stdout
    client = MlflowClient(trainkit_store.uri)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [0.5, 0.25]
    assert client.get_run(run_id).data.params == {"lr": "0.1"}
    assert status(trainkit_store, run_id) == ("FINISHED", None)
    assert pending(spool) == 0

    again = invoke("sync")
    assert again.exit_code == 0 and again.stdout.startswith("nothing to send")
    assert len(client.get_metric_history(run_id, "loss")) == 2


def test_sync_sets_aside_records_the_store_refuses(trainkit_store: TrainkitStore) -> None:
    spool = write_dead_spool(trainkit_store, "0" * 32)  # a run the store does not have
    result = invoke("sync", "--spool-dir", str(spool))
    assert result.exit_code == 1, result.output
    assert "set aside" in result.stdout and "run 00000000000000000000000000000000" in result.stdout
    assert pending(spool) == 0  # settled: they hold back nothing
    doctor = invoke("doctor", "--spool-dir", str(spool))
    assert "set aside in run 00000000000000000000000000000000" in doctor.stdout
