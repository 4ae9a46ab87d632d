"""Shared fixtures: one smoke-profile synthetic snapshot and cache per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def smoke_work_dir(tmp_path_factory):
    """A work dir holding the smoke profile's synthetic snapshot and prepared cache."""
    from ctlib.prepare import prepare_profile
    from ctlib.profiles import get_profile

    work = tmp_path_factory.mktemp("smoke-work")
    prepare_profile(get_profile("smoke", work_dir=str(work)), progress=False)
    return work


@pytest.fixture()
def smoke_profile(smoke_work_dir):
    from ctlib.profiles import get_profile

    return get_profile("smoke", work_dir=str(smoke_work_dir))
