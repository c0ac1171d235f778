"""Shared test setup: software rendering, Hydra composition, the shared reference folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "osmesa")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SHARED = REPO.parent / "shared"


def compose(overrides: list[str] | None = None):
    """The config `python -m pi05eval <overrides>` would run with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [])


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight policy bundle (scripts/make_tiny_policy.py), shared read-only by every test."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_policy", REPO / "scripts" / "make_tiny_policy.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path_factory.mktemp("tiny")
    script.make_tiny_policy(out, seed=0)
    return out


@pytest.fixture
def quiet_runner() -> list[str]:
    """Overrides for short, quiet real rollouts."""
    return ["runner.progress=false", "log_level=WARNING"]
