"""Off-policy AlignDistil training from a real Zarr store, through the real CLI entry point.

The store holds targets from the float64 dense reference on a tiny teacher pair, so the
student's exact full-vocabulary KL to pi* can be measured before and after training.
"""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aligndistil.cli import main
from tiny_models import build_tokenizer, load, save_model_dir
from trainer_support import dense_records, random_sequences, write_store
from student_trainer.losses import exact_reverse_kl
from student_trainer.metrics import read_jsonl

STEPS = 12          # 6 epochs of 2 steps (16 records, global batch 8)
COMMON = ["--global-batch-size", "8", "--max-tokens", "64", "--lr", "3e-3",
          "--no-progress", "--device", "cpu", "--log-level", "warning"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_pair):
    root = tmp_path_factory.mktemp("offpolicy")
    dpo_dir, rev_dir = teacher_pair
    student = save_model_dir(root / "student", seed=7)
    tok = build_tokenizer()
    records, log_pis = dense_records(dpo_dir, rev_dir, random_sequences(len(tok), 16, seed=1))
    store = write_store(root / "store", records, tok)  # 64-token shards: several shards
    return {"root": root, "student": student, "store": store, "records": records,
            "log_pis": log_pis}


@pytest.fixture(scope="module")
def full_run(world):
    """The reference run, reporting to every tracker: W&B offline, MLflow on a local file
    store (their own environment variables, as a user sets them)."""
    out = world["root"] / "run_full"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.setenv("MLFLOW_TRACKING_URI", (world["root"] / "mlruns").as_uri())
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in
        rc = main(["train", "--mode", "off-policy", "--store", str(world["store"]), "--model",
                   str(world["student"]), "--out", str(out), "--epochs", "6", "--save-every",
                   "3", "--save-total-limit", "5", "--report-to", "tensorboard,wandb,mlflow",
                   *COMMON])
    assert rc == 0
    return out


def exact_kl_to_pi_star(model_dir, records, log_pis) -> float:
    """Mean over response positions of the full-vocabulary KL(student || pi*)."""
    _, model = load(model_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for rec, log_pi in zip(records, log_pis):
            logits = model(input_ids=torch.tensor([rec.input_ids.tolist()])).logits[0]
            rows = logits[rec.prompt_len - 1:rec.seq_len - 1].double()
            kl = exact_reverse_kl(rows, torch.from_numpy(log_pi))
            total += float(kl.sum())
            count += kl.numel()
    return total / count


def test_loss_goes_down_and_the_students_kl_to_pi_star_drops(world, full_run):
    rows = read_jsonl(full_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss", "kl", "beta_mean", "alpha_mean", "reward_token_mean", "lr",
                "tokens_per_s", "grad_norm"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert all(r["sequences"] == 8 for r in rows)
    # tail_mass_mean: each epoch sees every record once, so its token-weighted mean is the
    # store's mean teacher mass outside the top-k
    want = np.mean(np.concatenate([np.exp(r.tail_logmass.astype(np.float64))
                                   for r in world["records"]]))
    first = [r for r in rows if r["epoch"] == 0]
    got = sum(r["tail_mass_mean"] * r["response_tokens"] for r in first) / \
        sum(r["response_tokens"] for r in first)
    assert 0 < want < 1 and got == pytest.approx(want, rel=1e-5)
    assert max(r["micro_batches"] for r in rows) > 1  # --max-tokens 64 forces accumulation
    # the KL split: its kept-ids and tail parts add up to it; the student's mass outside the
    # teacher's kept ids is a probability
    for r in rows:
        assert r["kl_topk"] + r["kl_tail"] == pytest.approx(r["kl"], rel=1e-9, abs=1e-12)
        assert 0.0 <= r["student_mass_outside_topk"] <= 1.0
    # Epoch e repeats the same 32 records in another order: compare whole epochs.
    epoch_loss = [np.mean([r["loss"] for r in rows if r["epoch"] == e]) for e in range(6)]
    assert epoch_loss[-1] < 0.75 * epoch_loss[0], epoch_loss
    assert all(b < a for a, b in zip(epoch_loss[1:], epoch_loss[2:])), epoch_loss
    before = exact_kl_to_pi_star(world["student"], world["records"], world["log_pis"])
    after = exact_kl_to_pi_star(full_run / "final", world["records"], world["log_pis"])
    assert after < 0.7 * before, (before, after)
    # warmup (ceil(0.1 * 12) = 2 steps) then cosine decay towards the default floor of
    # 0.1 x the peak (--min-lr-ratio 0.1, the released scripts')
    lrs = [r["lr"] for r in rows]
    assert lrs[0] == pytest.approx(1.5e-3) and lrs[1] == pytest.approx(3e-3)
    assert 3e-4 <= lrs[-1] < 4e-4 and all(b <= a for a, b in zip(lrs[1:], lrs[2:]))
    assert (full_run / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("checkpoint-00000003", "checkpoint-00000006", "checkpoint-00000009", "final"):
        folder = full_run / name
        assert (folder / "model.safetensors").is_file() and (folder / "trainer_state.pt").is_file()
        assert (folder / "tokenizer.json").is_file()


def _wandb_records(path):
    """The payloads of a W&B run file: LevelDB's log format (32 KiB blocks; each record has a
    4-byte checksum, a 2-byte length and a 1-byte type: 1 whole, 2 first, 3 middle, 4 last),
    after a 7-byte ':W&B' header. Read here so the test needs no W&B server."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if left < 7 or (kind == 0 and length == 0):  # a block's zero-filled end
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield parts
            parts = b""


def test_every_tracker_gets_the_same_metrics_and_the_config_once(world, full_run):
    """--report-to tensorboard,wandb,mlflow: each holds metrics.jsonl's scalars at its steps,
    read back from each library's own files (W&B offline run, MLflow file store, TensorBoard
    events), and the run's config once."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from wandb.proto import wandb_internal_pb2

    rows = read_jsonl(full_run / "metrics.jsonl")
    want = {(r["step"], f"train/{k}"): float(v) for r in rows for k, v in r.items()
            if k != "step" and isinstance(v, (int, float))}
    assert len(want) > 20 * len(rows) // 2 and ("train/kl", 1) not in want

    events = EventAccumulator(str(full_run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tensorboard = {(e.step, tag): e.value for tag in events.Tags()["scalars"]
                   for e in events.Scalars(tag)}
    assert tensorboard.keys() == want.keys()
    assert all(tensorboard[k] == pytest.approx(v, rel=1e-6, abs=1e-30) for k, v in want.items())

    ids = json.loads((full_run / "trackers.json").read_text())
    client = MlflowClient((world["root"] / "mlruns").as_uri())
    mlrun = client.get_run(ids["mlflow"])
    mlflow = {(m.step, key): m.value for key in mlrun.data.metrics
              for m in client.get_metric_history(ids["mlflow"], key)}
    assert mlflow == want
    assert mlrun.data.params["lr"] == "0.003" and mlrun.data.params["report_to"] == \
        "tensorboard,wandb,mlflow" and "api_key" not in mlrun.data.params

    (run_file,) = full_run.glob(f"wandb/offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb")
    wandb, configs = {}, []
    for payload in _wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            wandb.update({(items["_step"], k): float(v) for k, v in items.items()
                          if k.startswith("train/")})
        elif kind == "run":
            configs.append({item.key: json.loads(item.value_json)
                            for item in record.run.config.update})
        elif kind == "config":
            configs.append({item.key: json.loads(item.value_json)
                            for item in record.config.update})
    assert wandb == want
    (config,) = [c for c in configs if c]
    config = {k: v["value"] if isinstance(v, dict) and "value" in v else v
              for k, v in config.items()}  # some W&B versions wrap values as {"value": ...}
    assert config["lr"] == 3e-3 and config["epochs"] == 6
    assert "api_key" not in config


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(world, full_run, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    # step 3 is in the middle of epoch 1: the data position is not an epoch boundary
    shutil.copytree(full_run / "checkpoint-00000003", out / "checkpoint-00000003")
    rc = main(["train", "--mode", "off-policy", "--store", str(world["store"]), "--model",
               str(world["student"]), "--out", str(out), "--epochs", "6", "--save-every", "3",
               "--resume", *COMMON])
    assert rc == 0
    want = load_file(full_run / "final" / "model.safetensors")
    got = load_file(out / "final" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    full_rows = {r["step"]: r["loss"] for r in read_jsonl(full_run / "metrics.jsonl")}
    resumed_rows = {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl")}
    assert sorted(resumed_rows) == list(range(4, STEPS + 1))
    assert all(resumed_rows[s] == full_rows[s] for s in resumed_rows)


def test_a_store_made_with_another_tokenizer_is_refused(world, tmp_path, capsys):
    other = save_model_dir(tmp_path / "other_student", extra_words=3)
    rc = main(["train", "--mode", "off-policy", "--store", str(world["store"]), "--model",
               str(other), "--out", str(tmp_path / "run"), *COMMON])
    assert rc == 2
    err = capsys.readouterr().err
    assert "different tokenizer" in err and str(world["store"]) in err
    assert not (tmp_path / "run" / "final").exists()


def test_chunked_loss_and_bucket_tail_train(world, tmp_path):
    """--loss-chunk-size gives the same step as the unchunked loss; the default tail (bucket,
    without --student-top) and --tail uniform run."""
    runs = {}
    for name, extra in (("plain", []), ("chunked", ["--loss-chunk-size", "7"]),
                        ("bucket", ["--tail", "bucket"]), ("uniform", ["--tail", "uniform"])):
        out = tmp_path / name
        assert main(["train", "--mode", "off-policy", "--store", str(world["store"]),
                     "--model", str(world["student"]), "--out", str(out), "--max-steps", "2",
                     "--save-every", "0", "--report-to", "none", *COMMON, *extra]) == 0
        runs[name] = read_jsonl(out / "metrics.jsonl")
    for a, b in zip(runs["plain"], runs["chunked"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    # bucket <= uniform (log-sum inequality), on the same first batch and weights
    assert runs["plain"][0]["kl"] < runs["uniform"][0]["kl"]
    # the default (auto, no --student-top) is the bucket tail
    assert [r["loss"] for r in runs["plain"]] == [r["loss"] for r in runs["bucket"]]


def test_report_to_is_checked_before_any_work(world, tmp_path, capsys, monkeypatch):
    """An unknown tracker, 'none' beside another, a tracker whose package is missing, and a
    tracker that cannot start each stop the run with one line naming it, before a step."""
    from student_trainer import trackers

    monkeypatch.setitem(trackers.PACKAGES, "wandb", "aligndistil_no_such_package")
    base = ["train", "--mode", "off-policy", "--store", str(world["store"]), "--model",
            str(world["student"]), *COMMON]
    for value, message in (("tensorbord", "'tensorbord' is not a tracker"),
                           ("none,mlflow", "'none' is not a tracker"),
                           ("wandb", "the aligndistil_no_such_package package is not installed"),
                           ("mlflow", "could not start an MLflow run at")):
        out = tmp_path / value.replace(",", "_")
        # MLflow 3 refuses a file store unless asked: a tracker failing at its start
        monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
        monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
        assert main([*base, "--out", str(out), "--report-to", value]) == 2, value
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not (out / "final").exists() and not list(out.glob("checkpoint-*"))
