"""fingerprint(): canonical JSON, stability, and what it refuses."""

from __future__ import annotations

import dataclasses
import enum
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainkit_tracking import fingerprint
from trainkit_tracking._core.fingerprint import canonical_json, study_key, trial_key
from trainkit_tracking.models import RunKind, RunSpec


def test_canonical_json_form() -> None:
    assert (
        canonical_json({"b": 1, "a": [1.5, "x", None, True]}) == '{"a":[1.5,"x",null,true],"b":1}'
    )


def test_pinned_digest() -> None:
    text = canonical_json({"lr": 0.001, "batch": 16})
    assert text == '{"batch":16,"lr":0.001}'
    import hashlib

    assert fingerprint({"lr": 0.001, "batch": 16}) == hashlib.sha256(text.encode()).hexdigest()
    # Pinned literally: a change here would orphan every stored study/trial key.
    assert fingerprint({"lr": 0.001, "batch": 16}) == (
        "5e59673bcd1547288b9db29719751d52131184027604938cc4fdc9997483665a"
    )


def test_floats_normalised_to_12_significant_digits() -> None:
    assert fingerprint(0.1 + 0.2) == fingerprint(0.3)
    assert fingerprint(1.0) == fingerprint(1)
    assert fingerprint(-0.0) == fingerprint(0.0)
    assert fingerprint(1.0000001) != fingerprint(1.0)
    assert canonical_json(float("nan")) == '"NaN"'
    assert canonical_json(float("-inf")) == '"-Infinity"'


def test_strings_kept_as_given() -> None:
    assert fingerprint("A") != fingerprint("a")
    assert fingerprint(" a") != fingerprint("a")
    assert canonical_json("é") == '"é"'


def test_tuples_are_lists_and_length() -> None:
    assert fingerprint((1, 2)) == fingerprint([1, 2])
    assert len(fingerprint("x", length=8)) == 8
    with pytest.raises(ValueError, match="between 1 and 64"):
        fingerprint("x", length=0)


@dataclasses.dataclass
class _Point:
    x: int
    y: float


class _Color(enum.Enum):
    RED = "red"


def test_models_dataclasses_enums() -> None:
    assert fingerprint(_Point(1, 2.0)) == fingerprint({"x": 1, "y": 2.0})
    assert fingerprint(_Color.RED) == fingerprint("red")
    spec = RunSpec(kind=RunKind.FINAL_TRAINING, model="m", environment="local")
    assert fingerprint(spec) == fingerprint(spec.model_dump(mode="python"))


@pytest.mark.parametrize("bad", [{1, 2}, object(), b"bytes", {(1, 2): 3}])
def test_unsupported_types_raise_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match="fingerprint"):
        fingerprint(bad)


def test_stable_across_processes() -> None:
    value = {"lr": 3e-5, "layers": [1, 2, 3], "name": "bert", "nested": {"z": None}}
    code = (
        "from trainkit_tracking import fingerprint;"
        "print(fingerprint({'nested': {'z': None}, 'name': 'bert', 'layers': (1, 2, 3), 'lr': 3e-5}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == fingerprint(value)


def test_study_and_trial_keys() -> None:
    sk = study_key("bert", {"lr": [1e-5, 1e-4]}, folds=5)
    assert sk == study_key("bert", {"lr": [1e-5, 1e-4]}, folds=5)
    assert sk != study_key("bert", {"lr": [1e-5, 1e-4]}, folds=3)
    assert trial_key(sk, {"lr": 1e-5}) != trial_key(sk, {"lr": 2e-5})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_independent_of_dict_order(d: dict[str, object]) -> None:
    reordered = dict(reversed(list(d.items())))
    assert fingerprint(d) == fingerprint(reordered)


@given(json_values)
def test_equal_values_equal_fingerprints(value: object) -> None:
    assert fingerprint(value) == fingerprint(value)
    assert len(fingerprint(value)) == 64
