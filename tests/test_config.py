"""One config object per command: flags and ``--config FILE`` from it, the resolved config saved
beside the outputs, and a run replayed from that file giving the same outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aligndistil import config as cfg
from aligndistil.cli import COMMANDS, build_parser, parse_command
from live_server import REPO

ENV_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "aligndistil.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV_ONE_THREAD})


def _help_of(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return sub.format_help()


@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_every_option_of_every_command_states_its_default(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest in ("help", "config"):
            continue
        text = action.help or ""
        assert "default" in text or "required" in text, f"{command} {action.option_strings}"
    assert "--config FILE" in _help_of(command)


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("mode: off-policy\nmodel: m\nout: o\nstore: s\nlr: 3.0e-4\nepochs: 3\n"
                    "adam_betas: [0.8, 0.9]\nprogress: false\n")
    args = parse_command(["train", "--config", str(path), "--epochs", "5"])
    assert args.lr == 3e-4 and args.epochs == 5 and args.adam_betas == (0.8, 0.9)
    assert args.progress is False and args.global_batch_size == 128  # the dataclass default


@pytest.mark.parametrize("text, message", [
    ("lr: 1e-4\nlearning_rate: 3\n", "unknown option 'learning_rate'"),
    ("epochs: two\n", "epochs: expected an integer"),
    ("tail: gaussian\n", "tail: expected one of auto, uniform, bucket"),
    ("- a list\n", "expected a mapping"),
    ("lr: [1, 2\n", "not valid YAML"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    res = _cli("train", "--config", path, "--mode", "off-policy", "--model", "m", "--out",
               tmp_path / "out", "--store", "s")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert str(path) in lines[0] and message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_a_missing_required_option_names_the_flag_and_the_file_key():
    with pytest.raises(Exception, match="--model is required"):
        parse_command(["train", "--mode", "off-policy", "--out", "o"])


def test_secrets_are_never_saved():
    args = parse_command(["train", "--mode", "on-policy", "--model", "m", "--out", "o",
                          "--teacher-url", "http://x", "--prompts", "p",
                          "--api-key", "s3cret-key"])
    from student_trainer.recipes.configs import EvalConfig, TrainConfig

    config = TrainConfig(**{k: v for k, v in vars(args).items() if k != "command"})
    assert config.api_key == "s3cret-key"
    text = cfg.dump_config(config, "train")
    assert "s3cret-key" not in text and "api_key" not in text
    assert "s3cret" not in cfg.dump_config(EvalConfig(model="m", prompts="p", api_key="s3cret"),
                                           "eval")
    from teacher_service.config import ServeConfig

    assert "s3cret" not in cfg.dump_config(ServeConfig(dpo_model="d", api_key="s3cret"),
                                           "serve")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith("_config.yaml")}


def test_replaying_a_saved_config_gives_the_same_outputs(tmp_path):
    """toyworld, then sft on it: each saves its resolved config; replaying both from those
    files (only --out changed) writes byte-identical worlds and bitwise-identical weights."""
    first, second = tmp_path / "a", tmp_path / "b"
    res = _cli("toyworld", "--out", first / "world", "--demos", 200, "--train-prompts", 20,
               "--eval-prompts", 8, "--seed", 3, "--hidden-size", 64)
    assert res.returncode == 0, res.stderr
    saved_world = first / "world" / "toyworld_config.yaml"
    assert yaml.safe_load(saved_world.read_text())["demos"] == 200
    res = _cli("sft", "--model", first / "world" / "init", "--data",
               first / "world" / "sft_demos.jsonl", "--out", first / "sft", "--max-steps", 3,
               "--batch-size", 16, "--lr", 1e-3, "--device", "cpu", "--no-progress")
    assert res.returncode == 0, res.stderr
    saved_sft = yaml.safe_load((first / "sft" / "sft_config.yaml").read_text())
    assert saved_sft["max_steps"] == 3 and saved_sft["lr"] == 1e-3

    res = _cli("toyworld", "--config", saved_world, "--out", second / "world")
    assert res.returncode == 0, res.stderr
    assert _files(first / "world") == _files(second / "world")
    replay = tmp_path / "sft_replay.yaml"
    replay.write_text(yaml.safe_dump({**saved_sft, "model": str(second / "world" / "init"),
                                      "data": str(second / "world" / "sft_demos.jsonl")}))
    res = _cli("sft", "--config", replay, "--out", second / "sft")
    assert res.returncode == 0, res.stderr
    a = (first / "sft" / "model.safetensors").read_bytes()
    b = (second / "sft" / "model.safetensors").read_bytes()
    assert a == b
