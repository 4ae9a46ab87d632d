"""requirements-lock.txt agrees with pyproject.toml: every requirement pinned, every pin allowed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import lock  # noqa: E402  (scripts/lock.py, which writes the file)

LOCK = REPO / "requirements-lock.txt"


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for n, line in enumerate(LOCK.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line.strip())
        assert m, f"{LOCK.name}:{n}: {line!r} is not an exact pin name==version"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"{LOCK.name}:{n}: {name} pinned twice"
        pins[name] = Version(m.group(2))
    return pins


def test_lock_names_its_platform_and_not_ctlib():
    header = re.search(r"^# platform: (\S+)$", LOCK.read_text(), flags=re.M)
    assert header, "the lock must say which platform/Python it was made on (run_all.sh compares it)"
    assert re.fullmatch(r"[a-z0-9]+-[A-Za-z0-9_]+-py3\.\d+", header.group(1)), header.group(1)
    assert "ctlib" not in _pins(), "ctlib itself is installed from the checkout (pip install --no-deps -e .)"


@pytest.mark.parametrize("req", lock.project_requirements(), ids=str)
def test_every_requirement_is_pinned_within_its_range(req: Requirement):
    pins = _pins()
    name = canonicalize_name(req.name)
    assert name in pins, f"{req} (pyproject.toml) is not pinned in {LOCK.name}: run scripts/lock.py"
    assert req.specifier.contains(pins[name], prereleases=True), \
        f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject.toml's {req}"


def test_lock_script_finds_a_missing_requirement(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["no-such-package-ctlib-test>=1"]\n')
    with pytest.raises(SystemExit, match="no-such-package-ctlib-test>=1 .* is not installed"):
        lock.closure(lock.project_requirements(pyproject, extras=()))
