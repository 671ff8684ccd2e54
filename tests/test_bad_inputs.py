"""Nothing lost, no traceback: every command refuses bad input in one line, exits non-zero and
leaves every input as it was.

A table of bad invocations, each run through the real entry point (``aligndistil.cli.main``)
against real files: a teacher pair, a student, data, prompts, preference pairs, a complete store
and an incomplete one. For each: exit status 2, exactly one line on stderr naming the problem,
and the bytes of every input unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from aligndistil.cli import main
from tiny_models import save_model_dir

N_EXAMPLES = 12


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, teacher_pair):
    """Every input the table needs, under one folder whose bytes are checked after each case."""
    root = tmp_path_factory.mktemp("inputs")
    dpo, rev = (shutil.copytree(p, root / name) for p, name in zip(teacher_pair,
                                                                     ("dpo", "reverse")))
    student = save_model_dir(root / "student", seed=7)
    no_tok = shutil.copytree(student, root / "no_tokenizer")
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"sort {i} {i + 3} 1",
                                        "response": f"1 {i} {i + 3}"}) + "\n"
                            for i in range(N_EXAMPLES)))
    (root / "empty.jsonl").write_text("")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"sort {i} 2 7"}) + "\n" for i in range(4)))
    (root / "other_task.jsonl").write_text(json.dumps({"prompt": "hello how are you ?"}) + "\n")
    (root / "latin1.jsonl").write_bytes(json.dumps({"prompt": "sort 1 2"}).encode() + b"\n"
                                        + '{"prompt": "sort 3 caf\xe9"}\n'.encode("latin-1"))
    user = {"role": "user", "content": "sort 3 1"}
    (root / "prefs.jsonl").write_text(json.dumps({
        "prompt": "sort 3 1", "chosen": [user, {"role": "assistant", "content": "1 3"}],
        "rejected": [user, {"role": "assistant", "content": "3 1"}]}) + "\n")
    (root / "a_file").write_text("not a folder\n")
    (root / "not_a_store").mkdir()
    (root / "empty_folder").mkdir()
    (root / "not_a_store" / "notes.txt").write_text("mine\n")
    teacher = ["--dpo-model", str(dpo), "--reverse-model", str(rev), "--device", "cpu",
               "--no-progress"]
    assert main(["precompute", *teacher, "--data", str(data), "--out", str(root / "store"),
                 "--top-k", "4"]) == 0
    assert main(["precompute", *teacher, "--data", str(data), "--out",
                 str(root / "half_store"), "--top-k", "4", "--num-workers", "2",
                 "--worker-index", "0"]) == 0
    run = root / "old_run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    return {"root": root, "dpo": dpo, "rev": rev, "student": student, "no_tok": no_tok,
            "data": data, "prompts": prompts, "store": root / "store"}


def _case_argv(i: dict, out: Path) -> dict[str, tuple[list[str], str]]:
    r = i["root"]
    train = ["train", "--mode", "off-policy", "--store", str(i["store"]), "--model",
             str(i["student"]), "--device", "cpu", "--no-progress", "--report-to", "none"]
    on = ["train", "--mode", "on-policy", "--teacher-url", "http://127.0.0.1:9", "--prompts",
          str(i["prompts"]), "--model", str(i["student"]), "--device", "cpu"]
    pre = ["precompute", "--dpo-model", str(i["dpo"]), "--reverse-model", str(i["rev"]),
           "--device", "cpu", "--no-progress"]
    ev = ["eval", "--model", str(i["student"]), "--device", "cpu", "--max-new-tokens", "4"]
    sft = ["sft", "--model", str(i["student"]), "--data", str(i["data"]), "--device", "cpu"]
    dpo = ["dpo", "--model", str(i["student"]), "--data", str(r / "prefs.jsonl"), "--device",
           "cpu"]
    o = str(out)
    return {
        "train --lr 0": ([*train, "--out", o, "--lr", "0"], "--lr: must be > 0"),
        "train --lr=-1e-4": ([*train, "--out", o, "--lr=-1e-4"], "--lr: must be > 0"),
        "train --lr nan": ([*train, "--out", o, "--lr", "nan"], "--lr: must be a finite number"),
        "train --warmup-ratio 5": ([*train, "--out", o, "--warmup-ratio", "5"],
                                   "--warmup-ratio: must be in [0,1]"),
        "train --max-new-tokens 0": ([*on, "--out", o, "--max-new-tokens", "0"],
                                     "--max-new-tokens: must be >= 1"),
        "train --save-every -1": ([*train, "--out", o, "--save-every", "-1"],
                                  "--save-every: must be >= 0"),
        "train --batch 0": ([*train, "--out", o, "--global-batch-size", "0"],
                            "--global-batch-size: must be >= 1"),
        "train off-policy --teacher-url": ([*train, "--out", o, "--teacher-url", "http://x"],
                                           "--teacher-url only apply to --mode on-policy"),
        "train off-policy --top-k": ([*train, "--out", o, "--top-k", "4"],
                                     "--top-k only apply to --mode on-policy"),
        "train off-policy --objective reinforce": (
            [*train, "--out", o, "--objective", "reinforce-token"],
            "--objective reinforce-token is a policy gradient and needs samples from the "
            "student: use --mode on-policy"),
        "train --kl-coef < 0": ([*train, "--out", o, "--kl-coef", "-1"], "--kl-coef"),
        "train on-policy --store": ([*on, "--out", o, "--store", str(i["store"])],
                                    "--store only applies to --mode off-policy"),
        "train --out a file": ([*train, "--out", str(r / "a_file")], "is a file"),
        "train --out a used folder": ([*train, "--out", str(r / "old_run")],
                                      "already holds another run's files (metrics.jsonl)"),
        "train --out is --model": ([*train, "--out", str(i["student"])], "is also --model"),
        "train --out inside --model": ([*train, "--out", str(i["student"] / "run")],
                                       "lies inside --model"),
        "train incomplete store": ([*train, "--out", o, "--store", str(r / "half_store")],
                                   "is incomplete: worker 1 of 2 never committed"),
        "train model without tokenizer": ([*train, "--out", o, "--model", str(i["no_tok"])],
                                          "no tokenizer"),
        "train --resume --overwrite": ([*train, "--out", o, "--resume", "--overwrite"],
                                       "give one of them"),
        "train --config missing": ([*train, "--out", o, "--config", str(r / "nope.yaml")],
                                   "no such file"),
        "sft --batch-size 0": ([*sft, "--out", o, "--batch-size", "0"],
                               "--batch-size: must be >= 1"),
        "sft --data missing": ([*sft, "--out", o, "--data", str(r / "nope.jsonl")],
                               "--data " + str(r / "nope.jsonl") + ": no such file"),
        "dpo --out is --model": ([*dpo, "--out", str(i["student"])], "is also --model"),
        "dpo --data a folder without data": (
            [*dpo, "--out", o, "--data", str(r / "empty_folder")],
            "empty_folder[train]: The directory at"),
        "dpo --out a used folder": ([*dpo, "--out", str(r / "old_run")],
                                    "already holds another run's files"),
        "precompute --data a folder without data": (
            [*pre, "--out", o, "--data", str(r / "empty_folder")],
            "empty_folder[train]: The directory at"),
        "precompute --out a file": ([*pre, "--data", str(i["data"]), "--out", str(r / "a_file")],
                                    "is a file"),
        "precompute --out not a store": ([*pre, "--data", str(i["data"]), "--out",
                                          str(r / "not_a_store")], "is not a store"),
        "precompute --limit 0": ([*pre, "--data", str(i["data"]), "--out", o, "--limit", "0"],
                                 "--limit: must be >= 1"),
        "precompute --limit -1": ([*pre, "--data", str(i["data"]), "--out", o, "--limit", "-1"],
                                  "--limit: must be >= 1"),
        "precompute empty data": ([*pre, "--data", str(r / "empty.jsonl"), "--out", o],
                                  "nothing to precompute"),
        "precompute --top-k 0": ([*pre, "--data", str(i["data"]), "--out", o, "--top-k", "0"],
                                 "--top-k: must be >= 1"),
        "precompute --reference-model in adaptive": (
            [*pre, "--data", str(i["data"]), "--out", o, "--reference-model", str(i["rev"])],
            "--reference-model does not apply to --mode adaptive"),
        "precompute other data into a store": (
            [*pre, "--data", str(r / "prompts.jsonl"), "--out", str(i["store"]), "--top-k", "4"],
            "pass --overwrite"),
        "serve --top-k 0": (["serve", "--dpo-model", str(i["dpo"]), "--reverse-model",
                             str(i["rev"]), "--top-k", "0"], "--top-k: must be >= 1"),
        "eval --max-new-tokens 0": ([*ev, "--prompts", str(i["prompts"]), "--max-new-tokens",
                                     "0"], "--max-new-tokens: must be >= 1"),
        "eval non-UTF-8 prompts": ([*ev, "--prompts", str(r / "latin1.jsonl")],
                                   "latin1.jsonl:2: not UTF-8"),
        "eval task on another task's prompts": ([*ev, "--prompts", str(r / "other_task.jsonl"),
                                                 "--task", "sort"],
                                                "--task sort: not a sort prompt"),
        "eval --out is --prompts": ([*ev, "--prompts", str(i["prompts"]), "--out",
                                     str(i["prompts"])], "is also --prompts"),
        "eval --prompts a folder without data": (
            [*ev, "--prompts", str(r / "empty_folder")], "empty_folder[train]: The directory at"),
        "pairs --samples-per-prompt 1": (["pairs", "--model", str(i["student"]), "--prompts",
                                          str(i["prompts"]), "--out", o, "--samples-per-prompt",
                                          "1"], "--samples-per-prompt must be at least 2"),
        "toyworld --noise 2": (["toyworld", "--out", o, "--noise", "2"],
                               "--noise: must be in [0,1]"),
    }


CASES = sorted(_case_argv({"root": Path("r"), "store": Path("s"), "student": Path("m"),
                           "dpo": Path("d"), "rev": Path("v"), "data": Path("x"),
                           "prompts": Path("p"), "no_tok": Path("n")}, Path("o")))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_inputs_untouched(case, inputs, tmp_path, capsys):
    argv, expected = _case_argv(inputs, tmp_path / "out")[case]
    before = _tree_digest(inputs["root"])
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (case, rc, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in lines if line.startswith("aligndistil: error: ")]
    assert len(errors) == 1, lines
    assert expected in errors[0], (expected, errors[0])
    assert _tree_digest(inputs["root"]) == before, "an input changed"
