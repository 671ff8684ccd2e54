"""Session-wide fixtures: what many modules need, built once per test run.

- ``teacher_pair``: the tiny (dpo, reverse) model folders that most engine, server, store and
  trainer tests score with (``tiny_models.save_teacher_pair`` with its defaults). Read-only: a
  test that needs to change a model copies it first.
- ``toy_world``: a small toy world (``aligndistil toyworld``'s files) for the world and eval
  tests. Read-only as well.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import save_teacher_pair


@pytest.fixture(scope="session")
def teacher_pair(tmp_path_factory) -> tuple[Path, Path]:
    return save_teacher_pair(tmp_path_factory.mktemp("teacher_pair"))


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """``(folder, {name: path})`` of a small toy world."""
    from aligndistil.worlds.toy.build import WorldConfig, build_world

    out = tmp_path_factory.mktemp("toy_world")
    return out, build_world(WorldConfig(out=str(out), demos=300, train_prompts=40,
                                        eval_prompts=16))
