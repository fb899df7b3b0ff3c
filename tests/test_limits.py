"""MLflow's key and value rules, the same through every API: Run, TagSet, TagKeys."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    _validate_length_limit,
    _validate_metric_name,
    _validate_param_name,
    _validate_tag_name,
)

from trainkit_tracking import (
    Run,
    RunSpec,
    TagKeyError,
    TagKeys,
    TagSet,
    Tracker,
    TrackingError,
    TrackingWarning,
)
from trainkit_tracking._core.limits import check_key, key_problem
from trainkit_tracking.testing import TrainkitStore

BAD_KEYS = ["", ".", "..", "..a", "/lead", "a/../b", "a//b", "a/", "./a", "a$b", "x" * 251]
GOOD_KEYS = ["a..b", "a/..b", "eval/f1", "a b", "t:1", "x.y-z_w", "x" * 250]


@pytest.fixture
def run(trainkit_store: TrainkitStore) -> Iterator[Run]:
    with Tracker("limits").start_run(RunSpec(kind="hpo_sweep", model="m")) as run:
        yield run


def _apis(run: Run, key: str) -> dict[str, Callable[[], object]]:
    return {
        "metric": lambda: run.log_metrics({key: 1.0}),
        "param": lambda: run.log_params({key: 1}),
        "tag": lambda: run.set_tags({key: "v"}),
        "TagSet": lambda: TagSet({key: "v"}),
        "TagKeys": lambda: TagKeys.from_dict({"stage": key}),
    }


@pytest.mark.parametrize("key", BAD_KEYS)
def test_a_bad_key_is_the_same_error_through_every_api(run: Run, key: str) -> None:
    messages = {}
    for api, call in _apis(run, key).items():
        with pytest.raises(TagKeyError) as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError), api
        message = str(info.value)
        assert repr(key)[:40] in message, (api, message)
        # One message shape: "invalid <what> key '<key>': <why>; rename it".
        what = {"metric": "metric", "param": "param"}.get(api, "tag")
        assert f"invalid {what} key " in message and message.endswith("; rename it"), message
        messages[api] = message.split(": ", 1)[1] if api != "TagKeys" else message
    reasons = {api: m for api, m in messages.items() if api != "TagKeys"}
    # The reason after the key is the same sentence whichever way the key came in.
    assert len({m.split("': ", 1)[-1] for m in reasons.values()}) == 1, reasons
    assert messages["TagKeys"].startswith("logical tag name 'stage': invalid tag key ")


def test_a_dotted_key_is_accepted_everywhere_and_stored(
    run: Run, trainkit_store: TrainkitStore
) -> None:
    run.log_metrics({"a..b": 1.0})
    run.log_params({"a..b": 1})
    run.set_tags({"a..b": "v"})
    assert TagSet({"a..b": "v"}) == {"a..b": "v"}
    assert TagKeys.from_dict({"stage": "a..b"})["stage"] == "a..b"
    assert run.flush()
    data = MlflowClient(trainkit_store.uri).get_run(run.id).data
    assert data.metrics["a..b"] == 1.0
    assert data.params["a..b"] == "1"
    assert data.tags["a..b"] == "v"


def test_keys_mlflow_accepts_are_accepted_by_every_api(run: Run) -> None:
    for key in GOOD_KEYS:
        for call in _apis(run, key).values():
            call()
    assert run.flush()


def test_a_non_str_key_is_a_type_error(run: Run, trainkit_store: TrainkitStore) -> None:
    for api, call in _apis(run, 5).items():  # type: ignore[arg-type]
        if api == "param":
            continue  # params are flattened into "a.b" text keys (below)
        error = TagKeyError if api == "TagKeys" else TypeError  # a config file's error
        with pytest.raises(error, match="key must be a str, got 5"):
            call()
    run.log_params({5: 1, "layers": {0: 64}})  # type: ignore[dict-item]
    assert run.flush()
    params = MlflowClient(trainkit_store.uri).get_run(run.id).data.params
    assert params["5"] == "1" and params["layers.0"] == "64"


def test_a_long_value_is_cut_once_with_one_warning(run: Run) -> None:
    calls: list[tuple[Callable[[], object], int]] = [
        (lambda: run.log_params({"notes": "p" * 7000}), 6000),
        (lambda: run.set_tags({"notes": "t" * 9000}), 8000),
        (lambda: TagSet({"notes": "s" * 9000}), 8000),
    ]
    for call, limit in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        cuts = [w for w in caught if issubclass(w.category, TrackingWarning)]
        assert len(cuts) == 1, [str(w.message) for w in caught]
        assert f"'notes' is {limit + 1000} characters long" in str(cuts[0].message)
        assert f"at most {limit}" in str(cuts[0].message)
        assert cuts[0].filename == __file__  # attributed to the caller
    with pytest.warns(TrackingWarning):
        assert TagSet({"notes": "s" * 9000})["notes"] == "s" * 7997 + "..."


@settings(deadline=None)
@given(st.text(st.sampled_from(list("ab./ :$-_")), max_size=12) | st.text(max_size=260))
def test_our_key_rule_is_mlflows(key: str) -> None:
    ours = key_problem(key) is None
    for validate in (_validate_metric_name, _validate_param_name, _validate_tag_name):
        try:
            validate(key)
            _validate_length_limit("key", 250, key)
        except MlflowException:
            theirs = False
        else:
            theirs = True
        assert ours == theirs, (key, validate.__name__)
    if ours:
        assert check_key(key, "metric") == key


def _check(key: Any) -> str:
    return check_key(key, "param")


def test_check_key_errors() -> None:
    with pytest.raises(TagKeyError, match=r"invalid param key '': it is empty; rename it"):
        _check("")
    with pytest.raises(TagKeyError, match="251 characters, MLflow allows at most 250"):
        _check("x" * 251)
    with pytest.raises(TypeError, match=r"param key must be a str, got None \(NoneType\)"):
        _check(None)


def test_a_malformed_store_flavor_is_named_when_the_tracker_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRAINKIT_STORE_FLAVOR", "azure")
    with pytest.raises(TrackingError, match=r"TRAINKIT_STORE_FLAVOR='azure'.*azureml"):
        Tracker("exp")
