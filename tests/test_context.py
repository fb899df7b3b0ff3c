"""Run context tags against a real store: user, source, git, versions, host and scheduler."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from trainkit_tracking import RunSpec, TagKeyError, TagKeys, Tracker, TrackingError
from trainkit_tracking._core.tags import os_account
from trainkit_tracking._insight.context import RunContext, git_info, keep_mlflow_tags, source
from trainkit_tracking.testing import TrainkitStore

GIT_KEYS = ("mlflow.source.git.commit", "code.git.branch", "code.git.dirty")
SPEC = RunSpec(kind="final_training", model="tiny", environment="local")
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(repo: Path, *args: str) -> str:
    config = [
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.invalid",
        "-c",
        "commit.gpgsign=false",
    ]
    done = subprocess.run(
        ["git", *config, *args], cwd=repo, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git work tree with one commit on branch `feature/x` and a modified tracked file."""
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q")
    git(path, "checkout", "-q", "-b", "feature/x")
    (path / "train.py").write_text("print('v1')\n")
    git(path, "add", "train.py")
    git(path, "commit", "-q", "-m", "first")
    (path / "train.py").write_text("print('v2')\n")
    return path


def run_tags(tracker: Tracker, spec: RunSpec = SPEC) -> dict[str, str]:
    with tracker.start_run(spec) as run:
        pass
    return dict(MlflowClient(tracker.tracking_uri).get_run(run.id).data.tags)


# Git ----------------------------------------------------------------------------------


@needs_git
def test_git_tags_of_a_dirty_work_tree(trainkit_store: TrainkitStore, repo: Path) -> None:
    tags = run_tags(Tracker("ctx", cwd=repo))
    assert tags["mlflow.source.git.commit"] == git(repo, "rev-parse", "HEAD")
    assert len(tags["mlflow.source.git.commit"]) == 40
    assert tags["code.git.branch"] == "feature/x"
    assert tags["code.git.dirty"] == "true"


@needs_git
def test_git_tags_of_a_clean_work_tree_from_the_cwd(
    trainkit_store: TrainkitStore, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    git(repo, "commit", "-q", "-am", "second")
    (repo / "untracked.txt").write_text("untracked files do not make a tree dirty\n")
    monkeypatch.chdir(repo)
    tags = run_tags(Tracker("ctx", trainkit_store.uri))
    assert tags["mlflow.source.git.commit"] == git(repo, "rev-parse", "HEAD")
    assert tags["code.git.dirty"] == "false"


@needs_git
def test_detached_head_has_a_commit_but_no_branch(repo: Path) -> None:
    head = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "--detach")
    info = git_info(repo)
    assert info is not None
    assert (info.commit, info.branch, info.dirty) == (head, None, True)


@needs_git
def test_repository_without_commits_has_no_git_tags(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    assert git_info(tmp_path) is None


def test_outside_a_work_tree_no_git_tags_and_no_error(
    trainkit_store: TrainkitStore, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    tags = run_tags(Tracker("ctx", cwd=plain))
    assert not set(GIT_KEYS) & set(tags)
    assert tags["mlflow.source.type"] == "LOCAL"  # the rest of the context is there


def test_without_git_installed_no_git_tags_and_no_error(
    trainkit_store: TrainkitStore, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "no-git-here"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert git_info(repo) is None
    tags = run_tags(Tracker("ctx", cwd=repo))
    assert not set(GIT_KEYS) & set(tags)


@needs_git
def test_git_is_read_once_per_tracker(trainkit_store: TrainkitStore, repo: Path) -> None:
    tracker = Tracker("ctx", cwd=repo)
    with tracker.start_run(SPEC) as parent:
        # Later changes to the tree are not seen: the context is read on the first run.
        git(repo, "commit", "-q", "-am", "second")
        with parent.child("benchmarking") as child:
            pass
    client = MlflowClient(trainkit_store.uri)
    parent_tags = client.get_run(parent.id).data.tags
    child_tags = client.get_run(child.id).data.tags
    assert child_tags["mlflow.source.git.commit"] == parent_tags["mlflow.source.git.commit"]
    assert child_tags["code.git.dirty"] == "true"
    assert tracker._context.tags(tracker.keys) is tracker._context.tags(tracker.keys)


def test_context_off(trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch) -> None:
    off = run_tags(Tracker("ctx", context=False))
    assert "mlflow.user" not in off
    assert "code.host" not in off
    assert off["code.run_kind"] == "final_training"
    monkeypatch.setenv("TRAINKIT_CONTEXT", "0")
    assert "mlflow.source.name" not in run_tags(Tracker("ctx"))
    monkeypatch.setenv("TRAINKIT_CONTEXT", "maybe")
    with pytest.raises(TrackingError, match=r"TRAINKIT_CONTEXT='maybe'"):
        Tracker("ctx")


def test_git_off_keeps_the_rest(repo: Path) -> None:
    context = RunContext({"TRAINKIT_CONTEXT_GIT": "false"}, repo)
    tags = context.tags(TagKeys.default())
    assert not set(GIT_KEYS) & set(tags)
    assert tags["code.pid"] == str(os.getpid())


# User, source, versions, host -------------------------------------------------------


def test_context_tags_on_every_run(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USER", "ana")
    tracker = Tracker("ctx")
    sweep = tracker.start_run(RunSpec(kind="hpo_sweep", model="tiny"))
    with sweep, sweep.child("hpo_trial", trial_number=0, study_key_hash="ab" * 8) as trial:
        pass
    client = MlflowClient(trainkit_store.uri)
    for run_id in (sweep.id, trial.id):
        tags = client.get_run(run_id).data.tags
        assert tags["mlflow.user"] == "ana"
        assert tags["code.created_by"] == "ana"
        # pytest-xdist's workers run as `python -c`: a console, not a script
        script = sys.argv[0]
        expected = "<console>" if script in ("", "-c", "-") else os.path.abspath(script)
        assert tags["mlflow.source.name"] == expected
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["code.python_version"] == platform.python_version()
        assert tags["code.host"] == socket.gethostname()
        assert tags["code.pid"] == str(os.getpid())
        assert tags["code.versions.mlflow"] == importlib.metadata.version("mlflow")
        for dist in ("torch", "transformers", "optuna"):
            try:
                expected = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                assert f"code.versions.{dist}" not in tags
            else:
                assert tags[f"code.versions.{dist}"] == expected
        for key in ("code.slurm.job_id", "code.node_rank", "code.world_size"):
            assert key not in tags


def test_user_falls_back_to_the_os_account(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("USER", raising=False)
    monkeypatch.delenv("USERNAME", raising=False)
    expected = os_account()
    if os.name == "posix":
        import pwd

        assert expected == pwd.getpwuid(os.getuid()).pw_name
    tags = run_tags(Tracker("ctx"))
    assert tags["mlflow.user"] == tags["code.created_by"] == (expected or "system")
    assert tags["mlflow.user"] != ""


def test_user_tags_override_context_tags(trainkit_store: TrainkitStore) -> None:
    spec = SPEC.model_copy(update={"tags": {"code.host": "my-alias"}})
    assert run_tags(Tracker("ctx"), spec)["code.host"] == "my-alias"


def test_source_name_and_type() -> None:
    assert source({}, ["train.py"]) == (os.path.abspath("train.py"), "LOCAL")
    assert source({}, ["-c"]) == ("<console>", "LOCAL")
    assert source({}, []) == ("<console>", "LOCAL")
    assert source({"SLURM_JOB_ID": "7"}, ["/a/t.py"]) == ("/a/t.py", "JOB")
    assert source({"AZUREML_RUN_ID": "job_1"}, ["/a/t.py"])[1] == "JOB"
    assert source({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, ["/a/t.py"])[1] == "JOB"
    assert source({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, ["/a/t.py"])[1] == "LOCAL"


def test_versions_are_read_without_importing(trainkit_store: TrainkitStore) -> None:
    code = textwrap.dedent(
        """
        import sys
        from trainkit_tracking import RunSpec, Tracker
        with Tracker("ctx").start_run(RunSpec(kind="final_training", model="m")) as run:
            pass
        heavy = sorted({"torch", "transformers", "optuna"} & set(sys.modules))
        assert not heavy, heavy
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


# Where it ran -------------------------------------------------------------------------


def test_slurm_and_launcher_variables_become_tags(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "SLURM_JOB_ID": "4242",
        "SLURM_ARRAY_JOB_ID": "4200",
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_NODEID": "5",
        "WORLD_SIZE": "16",
    }.items():
        monkeypatch.setenv(name, value)
    tags = run_tags(Tracker("ctx"))
    assert tags["code.slurm.job_id"] == "4242"
    assert tags["code.slurm.array_job_id"] == "4200"
    assert tags["code.slurm.array_task_id"] == "3"
    assert tags["code.node_rank"] == "5"
    assert tags["code.world_size"] == "16"
    assert tags["mlflow.source.type"] == "JOB"
    monkeypatch.setenv("GROUP_RANK", "2")  # torchrun's node rank wins over SLURM's
    assert run_tags(Tracker("ctx"))["code.node_rank"] == "2"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SLURM_JOB_ID", "12a"),
        ("SLURM_ARRAY_TASK_ID", "-1"),
        ("GROUP_RANK", "one"),
        ("SLURM_NODEID", "1.5"),
        ("WORLD_SIZE", "0"),
    ],
)
def test_malformed_numbers_are_errors_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(TrackingError) as caught:
        Tracker("ctx", environ={name: value})
    assert f"{name}={value!r}" in str(caught.value)


# Tag keys ------------------------------------------------------------------------------


def test_context_keys_are_registered() -> None:
    keys = TagKeys.default()
    assert keys["mlflow_user"] == "mlflow.user"
    assert keys["source_name"] == "mlflow.source.name"
    assert keys["git_commit"] == "mlflow.source.git.commit"
    assert keys["versions_torch"] == "code.versions.torch"
    assert keys["slurm_array_task_id"] == "code.slurm.array_task_id"
    renamed = TagKeys.from_dict({"host": "myorg.host", "git_dirty": "myorg.git.dirty"})
    tags = RunContext({}, None).tags(renamed)
    assert "myorg.host" in tags
    assert "code.host" not in tags


@pytest.mark.parametrize(
    "name", ["mlflow_user", "source_name", "source_type", "git_commit", "parent_run_id"]
)
def test_mlflow_own_tags_cannot_be_remapped(name: str) -> None:
    with pytest.raises(TagKeyError, match=repr(name)):
        TagKeys.from_dict({name: "myorg.elsewhere"})
    assert TagKeys.from_dict({name: TagKeys.default()[name]}) == TagKeys.default()


def test_an_adopted_run_keeps_its_own_mlflow_context() -> None:
    keys = TagKeys.default()
    ours = RunContext({"USER": "ana"}, None).tags(keys)
    existing = {"mlflow.user": "azure-identity", "mlflow.source.type": "JOB", "x": "1"}
    kept = keep_mlflow_tags(ours, existing, keys)
    assert "mlflow.user" not in kept
    assert "mlflow.source.type" not in kept
    assert kept["mlflow.source.name"] == ours["mlflow.source.name"]
    assert kept["code.host"] == ours["code.host"]
    assert keep_mlflow_tags(ours, {"x": "1"}, keys) is ours
