"""Models and datasets by Hub id, offline, from a Hugging Face cache laid out in the library's
own layout (``hub_cache.py``; ``huggingface_hub.scan_cache_dir`` reads it back), and datasets
read through the ``datasets`` library from local folders.

Nothing here reaches the Hub: ``HF_HUB_OFFLINE=1`` throughout, so a download is never tried
(what a download would do is the library's, and is not tested here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aligndistil.cli import main, parse_command
from hub_cache import folder_files, put_in_hub_cache
from storage.datasets import DataError, data_source, read_examples, source_fingerprint
from storage.hub import HubError, parse_hub_id, resolve_snapshot, snapshot_ref
from storage.store import TargetStore
from tiny_models import save_model_dir

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
DATA_COMMIT = "d" * 40
TEACHER = ["--device", "cpu", "--no-progress", "--top-k", "4"]


def _pref_rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        nums = rng.integers(0, 100, size=int(rng.integers(2, 6))).tolist()
        user = {"role": "user", "content": "sort " + " ".join(map(str, nums))}
        rows.append({"prompt": user["content"],
                     "chosen": [user, {"role": "assistant",
                                       "content": " ".join(map(str, sorted(nums)))}],
                     "rejected": [user, {"role": "assistant", "content": "no"}]})
    return rows


def _parquet_bytes(rows: list[dict], tmp: Path) -> bytes:
    path = tmp / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path.read_bytes()


README = """---
configs:
- config_name: default
  data_files:
  - split: train_prefs
    path: data/train_prefs-*.parquet
  - split: test_prefs
    path: data/test_prefs-*.parquet
- config_name: small
  data_files:
  - split: train_prefs
    path: small/train_prefs-*.parquet
---
# prefs
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory, teacher_pair):
    """A cache with the teacher pair as ``tiny/dpo`` (two commits: main -> B) and
    ``tiny/reverse``, and a dataset ``tiny/prefs`` (configs default and small)."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "hf_home" / "hub"
    dpo, rev = teacher_pair
    put_in_hub_cache(cache, "tiny/dpo", folder_files(dpo), commit=COMMIT_A)
    put_in_hub_cache(cache, "tiny/dpo", folder_files(dpo), commit=COMMIT_B)  # main is now B
    put_in_hub_cache(cache, "tiny/reverse", folder_files(rev), commit=COMMIT_A)
    for repo in ("models--tiny--dpo", "models--tiny--reverse"):  # a tag v1 -> commit A
        (cache / repo / "refs" / "v1").write_text(COMMIT_A)
    # a model that only has pickle weights: refused, never loaded
    pickled = save_model_dir(root / "pickled", seed=3)
    files = folder_files(pickled)
    files["pytorch_model.bin"] = files.pop("model.safetensors")
    put_in_hub_cache(cache, "tiny/pickled", files, commit=COMMIT_A)
    rows, small = _pref_rows(12, seed=0), _pref_rows(4, seed=1)
    put_in_hub_cache(cache, "tiny/prefs", {
        "README.md": README.encode(),
        "data/train_prefs-00000-of-00001.parquet": _parquet_bytes(rows, root),
        "data/test_prefs-00000-of-00001.parquet": _parquet_bytes(rows[:3], root),
        "small/train_prefs-00000-of-00001.parquet": _parquet_bytes(small, root),
    }, commit=DATA_COMMIT, repo_type="dataset")
    jsonl = root / "prefs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "cache": cache, "dpo": dpo, "rev": rev, "rows": rows, "small": small,
            "jsonl": jsonl}


@pytest.fixture
def offline(hub, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hub["cache"].parent))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return hub


def test_the_cache_is_in_the_librarys_own_layout(hub):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub["cache"])
    assert not info.warnings, info.warnings
    found = {(r.repo_type, r.repo_id): {v.commit_hash for v in r.revisions} for r in info.repos}
    assert found[("model", "tiny/dpo")] == {COMMIT_A, COMMIT_B}
    assert found[("dataset", "tiny/prefs")] == {DATA_COMMIT}


def test_hub_ids_resolve_to_snapshots_and_local_paths_stay_local(offline, tmp_path,
                                                                  monkeypatch):
    assert parse_hub_id("tiny/dpo@main") == ("tiny/dpo", "main")
    assert parse_hub_id("no-slash") is None and parse_hub_id("a/b/c") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny" / "dpo").mkdir(parents=True)  # an existing folder wins over an id
    assert parse_hub_id("tiny/dpo") is None
    monkeypatch.chdir(offline["root"])
    main_ref = resolve_snapshot("tiny/dpo", repo_type="model", flag="--dpo-model")
    pinned = resolve_snapshot(f"tiny/dpo@{COMMIT_A}", repo_type="model", flag="--dpo-model")
    assert (main_ref.commit, pinned.commit) == (COMMIT_B, COMMIT_A)
    assert snapshot_ref(pinned.path) == pinned and str(pinned) == f"tiny/dpo@{COMMIT_A}"
    assert snapshot_ref(offline["dpo"]) is None


def test_precompute_from_hub_ids_equals_local_folders_and_records_the_commits(offline):
    """--dpo-model/--reverse-model/--data by Hub id give the records that local folders and a
    local file of the same rows give; the store records each id at its commit."""
    root = offline["root"]
    local, hub_store = root / "store_local", root / "store_hub"
    assert main(["precompute", "--dpo-model", str(offline["dpo"]), "--reverse-model",
                 str(offline["rev"]), "--data", str(offline["jsonl"]), "--out", str(local),
                 *TEACHER]) == 0
    assert main(["precompute", "--dpo-model", f"tiny/dpo@{COMMIT_A}", "--reverse-model",
                 "tiny/reverse", "--data", "tiny/prefs", "--split", "train_prefs", "--out",
                 str(hub_store), *TEACHER]) == 0
    a, b = TargetStore.open(local), TargetStore.open(hub_store)
    assert len(a) == len(b) == 12
    for i in range(12):
        ra, rb = a[i], b[i]
        assert ra.example_index == rb.example_index
        for name in ("input_ids", "topk_ids", "topk_logprobs", "alpha", "tail_logmass"):
            assert np.array_equal(getattr(ra, name), getattr(rb, name)), name
    meta = b.metadata
    assert meta.teachers["dpo"].startswith(f"tiny/dpo@{COMMIT_A}@sha256:")
    assert meta.teachers["reverse"].startswith(f"tiny/reverse@{COMMIT_A}@sha256:")
    assert meta.source_fingerprint == f"hub:tiny/prefs@{DATA_COMMIT};config=;split=train_prefs"


def test_a_resume_against_another_commit_is_refused(offline, capsys):
    """The same weights at another commit are another teacher: the store refuses to mix."""
    store = offline["root"] / "store_commits"
    argv = ["--reverse-model", "tiny/reverse", "--data", "tiny/prefs", "--split", "train_prefs",
            "--out", str(store), "--limit", "4", *TEACHER]
    assert main(["precompute", "--dpo-model", f"tiny/dpo@{COMMIT_A}", *argv]) == 0
    capsys.readouterr()
    assert main(["precompute", "--dpo-model", "tiny/dpo", *argv]) == 2  # main is commit B
    err = capsys.readouterr().err
    assert "teachers" in err and COMMIT_B in err and "Traceback" not in err, err
    assert len(TargetStore.open(store)) == 4  # what was there is untouched


def test_revision_pins_every_model_id_without_its_own(offline, capsys):
    """--revision REV is @REV on each model flag given as a Hub id that has none; an id's own
    @REV wins; the store records the commit the revision names."""
    data = ["--data", str(offline["jsonl"])]
    commands = {
        "precompute": (["--dpo-model", "tiny/dpo", "--reverse-model", "tiny/reverse@main",
                        *data, "--out", "o"],
                       {"dpo_model": "tiny/dpo@v1", "reverse_model": "tiny/reverse@main"}),
        "serve": (["--dpo-model", "tiny/dpo", "--reverse-model", str(offline["rev"])],
                  {"dpo_model": "tiny/dpo@v1", "reverse_model": str(offline["rev"])}),
        "train": (["--mode", "off-policy", "--model", "tiny/dpo", "--out", "o"],
                  {"model": "tiny/dpo@v1"}),
        "dpo": (["--model", "tiny/dpo", *data, "--out", "o"], {"model": "tiny/dpo@v1"}),
        "sft": (["--model", "tiny/dpo", *data, "--out", "o"], {"model": "tiny/dpo@v1"}),
        "eval": (["--model", "tiny/dpo", "--prompts", "p.jsonl"], {"model": "tiny/dpo@v1"}),
        "reward-accuracy": (["--dpo-model", "tiny/dpo", "--reverse-model", "tiny/reverse",
                             "--reference-model", "tiny/reverse@" + COMMIT_A],
                            {"dpo_model": "tiny/dpo@v1", "reverse_model": "tiny/reverse@v1",
                             "reference_model": "tiny/reverse@" + COMMIT_A}),
    }
    for command, (argv, expected) in commands.items():
        parsed = vars(parse_command([command, *argv, "--revision", "v1"]))
        assert {k: parsed[k] for k in expected} == expected, command

    store = offline["root"] / "store_revision"
    argv = ["precompute", "--dpo-model", "tiny/dpo", "--reverse-model", "tiny/reverse",
            "--data", "tiny/prefs", "--split", "train_prefs", "--limit", "3", *TEACHER]
    assert main([*argv, "--out", str(store), "--revision", "v1"]) == 0
    teachers = TargetStore.open(store).metadata.teachers
    assert teachers["dpo"].startswith(f"tiny/dpo@{COMMIT_A}@")  # v1, not main (commit B)
    assert teachers["reverse"].startswith(f"tiny/reverse@{COMMIT_A}@")
    capsys.readouterr()
    for bad, message in [(["--revision", "v9"], "hf download tiny/dpo --revision v9"),
                         (["--revision", "v1 x"], "--revision 'v1 x': not a branch, tag or"),
                         (["--revision", "v1", "--dpo-model", str(offline["dpo"]),
                           "--reverse-model", str(offline["rev"])],
                          "--revision v1: none of --dpo-model, --reverse-model, "
                          "--reference-model is a Hub id")]:
        out = offline["root"] / "store_bad_revision"
        assert main([*argv, "--out", str(out), *bad]) == 2, bad
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (bad, err)
        assert not (out / "zarr.json").exists()


def test_dataset_configs_splits_and_local_folders(offline, tmp_path):
    small = data_source("tiny/prefs", split="train_prefs", config_name="small")
    got = [e.response for e in read_examples(small)]
    assert got == [r["chosen"][-1]["content"] for r in offline["small"]]
    assert str(small) == f"tiny/prefs@{DATA_COMMIT}[small/train_prefs]"
    test = list(read_examples(data_source("tiny/prefs", split="test_prefs")))
    assert [e.index for e in test] == [0, 1, 2] and test[0].source.endswith(":row 0")
    # workers split a dataset by row index, as they split files
    parts = [[e.index for e in read_examples(data_source("tiny/prefs", split="train_prefs"),
                                             worker_index=w, num_workers=3)] for w in range(3)]
    assert sorted(sum(parts, [])) == list(range(12)) and parts[1] == [1, 4, 7, 10]
    # a local dataset folder (here: the snapshot itself, copied) reads the same rows
    folder = tmp_path / "prefs_folder"
    for rel, path in folder_files(small.path).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(path.read_bytes())
    copy = data_source(folder, split="train_prefs", config_name="small")
    assert [e.response for e in read_examples(copy)] == got
    assert source_fingerprint(copy).startswith("folder:sha256:")
    with pytest.raises(DataError, match=r"tiny/prefs@d+\[nope\].*"):
        list(read_examples(data_source("tiny/prefs", split="nope")))


def test_hub_errors_name_the_flag_and_the_way_out(offline, tmp_path, capsys):
    cases = {
        "absent model": (["precompute", "--dpo-model", "tiny/absent", "--reverse-model",
                          "tiny/reverse", "--data", str(offline["jsonl"])],
                         ["--dpo-model tiny/absent", "not in the Hugging Face cache",
                          str(offline["cache"]), "hf download tiny/absent"]),
        "absent revision": (["precompute", "--dpo-model", "tiny/dpo@v9", "--reverse-model",
                             "tiny/reverse", "--data", str(offline["jsonl"])],
                            ["--dpo-model tiny/dpo@v9", "--revision v9"]),
        "pickle only": (["precompute", "--dpo-model", "tiny/pickled", "--reverse-model",
                         "tiny/reverse", "--data", str(offline["jsonl"])],
                        ["--dpo-model", "no *.safetensors weights"]),
        "absent dataset": (["precompute", "--dpo-model", "tiny/dpo", "--reverse-model",
                            "tiny/reverse", "--data", "tiny/absent-prefs"],
                           ["--data tiny/absent-prefs", "hf download tiny/absent-prefs "
                            "--repo-type dataset"]),
        "split of a file": (["precompute", "--dpo-model", "tiny/dpo", "--reverse-model",
                             "tiny/reverse", "--data", str(offline["jsonl"]), "--split", "x"],
                            ["is a file: --split and --data-config only apply to a dataset"]),
        "neither": (["precompute", "--dpo-model", "tiny/dpo", "--reverse-model", "tiny/reverse",
                     "--data", "no_such_file.jsonl"],
                    ["--data no_such_file.jsonl: no such file or folder, and not a Hub"]),
    }
    for name, (argv, messages) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        assert main([*argv, "--out", str(out), *TEACHER]) == 2, name
        err = capsys.readouterr().err
        assert "Traceback" not in err, (name, err)
        for message in messages:
            assert message in err, (name, message, err)
        assert not (out / "zarr.json").exists(), name


def test_sft_and_dpo_take_a_model_and_data_by_hub_id(offline, tmp_path):
    """The training commands resolve the same way (here: one DPO step on the Hub's pairs)."""
    out = tmp_path / "dpo"
    assert main(["dpo", "--model", "tiny/reverse", "--data", "tiny/prefs", "--split",
                 "test_prefs", "--out", str(out), "--batch-size", "3", "--max-steps", "1",
                 "--device", "cpu", "--no-progress", "--report-to", "none",
                 "--log-level", "warning"]) == 0
    assert (out / "model.safetensors").is_file()
    saved = (out / "dpo_config.yaml").read_text()
    assert "model: tiny/reverse" in saved and "split: test_prefs" in saved
