"""The package's __version__, the installed distribution's version and CHANGELOG.md agree."""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import trainkit_tracking

CHANGELOG = Path(__file__).resolve().parents[1] / "CHANGELOG.md"
_RELEASE = re.compile(
    r"^## \[(?P<version>\d+\.\d+\.\d+[^\]]*)\] - (?P<date>\d{4}-\d{2}-\d{2})\s*$", re.M
)
_HEADING = re.compile(r"^## .*$", re.M)


def test_version_matches_the_installed_distribution() -> None:
    # An editable install reads the version at install time: reinstall after bumping it.
    assert trainkit_tracking.__version__ == importlib.metadata.version("trainkit-tracking"), (
        "trainkit_tracking/_version.py and the installed metadata disagree: "
        "run `.venv/bin/pip install -e .` after changing the version"
    )


def test_version_is_the_one_pyproject_builds_from() -> None:
    # The wheel's version comes from the file hatchling reads, not from the installed copy.
    root = CHANGELOG.parent
    pyproject = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" in pyproject["project"]["dynamic"], "the version must stay in one place"
    source = root / pyproject["tool"]["hatch"]["version"]["path"]
    match = re.search(r'^__version__ = "([^"]+)"$', source.read_text(encoding="utf-8"), re.M)
    assert match, f'{source} has no __version__ = "X.Y.Z" line'
    assert match.group(1) == trainkit_tracking.__version__, (match.group(1), source)
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?", match.group(1)), match.group(1)


def test_changelog_has_an_unreleased_section_first() -> None:
    headings = _HEADING.findall(CHANGELOG.read_text(encoding="utf-8"))
    assert headings, "CHANGELOG.md has no '## ' headings"
    assert headings[0].strip() == "## [Unreleased]", headings[0]


def test_every_release_heading_is_well_formed() -> None:
    headings = _HEADING.findall(CHANGELOG.read_text(encoding="utf-8"))
    bad = [h for h in headings[1:] if not _RELEASE.fullmatch(h)]
    assert not bad, f"release headings must read '## [X.Y.Z] - YYYY-MM-DD': {bad}"


def test_newest_release_is_the_package_version() -> None:
    releases = _RELEASE.findall(CHANGELOG.read_text(encoding="utf-8"))
    if releases:  # before the first release, only [Unreleased] exists
        newest = releases[0][0]
        assert newest == trainkit_tracking.__version__, (
            f"CHANGELOG.md's newest release is {newest!r} but __version__ is "
            f"{trainkit_tracking.__version__!r}: bump trainkit_tracking/_version.py or the heading"
        )


def test_the_consumer_pins_this_version() -> None:
    requirements = CHANGELOG.parent / "tests" / "consumer" / "requirements.txt"
    pins = re.findall(
        r"^trainkit-tracking==(\S+)\s*$", requirements.read_text(encoding="utf-8"), re.M
    )
    assert pins == [trainkit_tracking.__version__], (
        f"tests/consumer/requirements.txt pins {pins}, the package is "
        f"{trainkit_tracking.__version__!r}: update the pin with the version"
    )
