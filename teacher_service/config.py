"""The options of ``aligndistil serve`` and ``aligndistil precompute``, written once.

Plain dataclasses (no torch import): the command line's flags, ``--config`` files and the saved
configs are all generated from these fields. ``serve`` and ``precompute`` share
:class:`TeacherOptions` — the teachers, the target math and the engine — so both build the
engine the same way (:func:`teacher_service.engine.build_engine`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from causal_lm.options import AttentionOptions
from storage.datasets import DatasetOptions, require_data
from storage.hub import HubOptions
from storage.errors import ConfigError
from storage.outputs import refuse_output_on_inputs
from storage.store.location import is_object_url

SECRET = "secret"  # the marker aligndistil.config looks for (never saved)
#: The resolved configs precompute saves in its store (one per worker).
SAVED_CONFIG = re.compile(r"^precompute-w\d{4}\.config\.yaml$")


def saved_config_name(worker: int) -> str:
    """The name of worker ``worker``'s saved config inside the store (matches SAVED_CONFIG)."""
    return f"precompute-w{worker:04d}.config.yaml"


@dataclass(kw_only=True)
class TeacherOptions(HubOptions, AttentionOptions):
    MODEL_FIELDS = ("dpo_model", "reverse_model", "reference_model")
    dpo_model: Annotated[str, "the DPO-trained teacher: a Hugging Face folder or a Hub id "
                         "(owner/name[@revision])"]
    reverse_model: Annotated[str | None, "the reverse-DPO teacher (modes adaptive, constant): "
                             "a folder or a Hub id"] = None
    reference_model: Annotated[str | None, "the reference (SFT) model (modes vanilla, "
                               "vanilla-adaptive): a folder or a Hub id"] = None
    mode: Annotated[Literal["adaptive", "constant", "vanilla", "vanilla-adaptive"],
                    "how the teacher is built (vanilla, vanilla-adaptive: from the reference "
                    "model)"] = "adaptive"
    top_k: Annotated[int, "top-k entries of log pi* kept per position", ">=1"] = 64
    dpo_top: Annotated[int, "keep log pi* on the dpo model's top N ids too (within --top-k: the "
                       "rest are pi*'s best; 0: pi*'s top-k only); with --tail-budget, its "
                       "best N are candidates and its mass is held to the same budget "
                       "(--top-k minus 1: the whole cap); a student near the dpo model puts "
                       "its mass there (docs/training.md)", ">=0"] = 0
    tail_budget: Annotated[float, "keep, per position, the fewest of pi*'s best ids whose mass "
                           "reaches 1 - EPS (at least --min-k, at most --top-k, which becomes "
                           "the cap; with --dpo-top, the dpo model's best ids to the same "
                           "budget too); 0: --top-k ids everywhere (docs/training.md)",
                           "[0,1)"] = 0.0
    min_k: Annotated[int, "with --tail-budget: the fewest ids a position keeps", ">=1"] = 1
    r: Annotated[float | None, "alpha_t = r * tvd_t + eps; none: the released runs' value for "
                 "the norm and policy (half-l1 20 off-policy / 30 on-policy; l1 10 / 15)",
                 ">=0"] = None
    eps: Annotated[float, "alpha_t = r * tvd_t + eps", ">0"] = 1e-3
    tvd_norm: Annotated[Literal["half-l1", "l1"], "half-l1: the paper's TVD; l1: the released "
                        "code's"] = "half-l1"
    beta0: Annotated[float, "the teachers' DPO beta", ">0"] = 0.1
    beta: Annotated[float, "modes constant/vanilla: alpha = beta0 / beta", ">0"] = 0.05
    device: Annotated[Literal["auto", "cpu", "cuda"], "where the teachers run"] = "auto"
    dpo_devices: Annotated[str | None, "split the dpo teacher's layers over these devices in "
                           "order (cuda:0,cuda:1; its head and the target math on the last), or "
                           "let accelerate place it (auto, balanced); none: all on --device"] = \
        None
    reverse_devices: Annotated[str | None, "the same for the reverse (or reference) "
                               "teacher"] = None
    dtype: Annotated[Literal["auto", "float32", "bfloat16", "float16"], "model weights (auto: "
                     "float32 on CPU, bfloat16 on GPU); the target math is always float32"] = \
        "auto"
    max_seq_len: Annotated[int | None, "longest prompt + response (none: the models' "
                           "maximum)", ">=2"] = None
    max_batch_tokens: Annotated[int, "tokens per engine pass (padded layout: sequences x "
                                "longest; packed: rows x longest)", ">=2"] = 8192
    packing: Annotated[Literal["auto", "on", "off"], "padding-free forwards, sequences packed "
                       "back to back (auto: when a probe shows the models keep packed "
                       "sequences apart; on: refuse models that do not)"] = "auto"
    chunk_size: Annotated[int, "response positions per LM-head chunk (memory O(chunk x V))",
                          ">=1"] = 256
    trust_remote_code: Annotated[bool, "allow model code from the model folder (it runs "
                                 "arbitrary code)"] = False

    #: "off" or "on": which released r applies when --r is not given.
    POLICY = "off"
    #: Used when --max-seq-len is not given (capped at the models' maximum); None: the models'.
    DEFAULT_MAX_SEQ_LEN = None

    def other_model(self) -> str:
        """The second teacher: the reverse model, or the reference model in mode vanilla."""
        if self.mode in ("vanilla", "vanilla-adaptive"):
            if not self.reference_model:
                raise ConfigError(f"--mode {self.mode} needs --reference-model")
            return self.reference_model
        if not self.reverse_model:
            raise ConfigError(f"--mode {self.mode} needs --reverse-model")
        return self.reverse_model

    def resolved_r(self) -> float:
        from teacher_service.targets import default_r

        return self.r if self.r is not None else default_r(self.tvd_norm, self.POLICY)

    def validate(self) -> None:
        from causal_lm.placement import parse_devices

        self.other_model()
        for flag, value in (("--dpo-devices", self.dpo_devices),
                            ("--reverse-devices", self.reverse_devices)):
            if value is not None:
                parse_devices(value, flag)
        if self.dpo_top >= self.top_k:
            raise ConfigError(f"--dpo-top {self.dpo_top} must be below --top-k {self.top_k}: "
                              f"the dpo model's top ids are kept within the top-k entries, and "
                              f"pi*'s own top ids need at least one of them")
        if not 0 <= self.tail_budget < 1:
            raise ConfigError(f"--tail-budget must be in [0, 1) (the teacher mass a position may "
                              f"leave out), got {self.tail_budget}")
        if self.min_k > self.top_k:
            raise ConfigError(f"--min-k {self.min_k} must be at most --top-k {self.top_k}")
        if self.min_k != 1 and not self.tail_budget:
            raise ConfigError("--min-k applies with --tail-budget only (without it every "
                              "position keeps --top-k ids)")
        if self.mode in ("vanilla", "vanilla-adaptive") and self.reverse_model:
            raise ConfigError(f"--reverse-model does not apply to --mode {self.mode} (it uses "
                              f"--reference-model)")
        if self.mode in ("adaptive", "constant") and self.reference_model:
            raise ConfigError(f"--reference-model does not apply to --mode {self.mode} (it uses "
                              f"--reverse-model; the reference is for modes vanilla and "
                              f"vanilla-adaptive)")


@dataclass(kw_only=True)
class ServeConfig(TeacherOptions):
    host: Annotated[str, "bind address (loopback by default; expose deliberately, with "
                    "--api-key)"] = "127.0.0.1"
    port: Annotated[int, "TCP port", "[0,65535]"] = 8000
    api_key: Annotated[str | None, "require 'Authorization: Bearer KEY' (default: "
                       "$ALIGNDISTIL_API_KEY)", SECRET] = None
    batch_wait_ms: Annotated[float, "how long a pass waits for concurrent requests to join", ">=0"] = 5.0
    max_queue: Annotated[int, "requests waiting for the engine before new ones get 429", ">=1"] = 256
    max_body_bytes: Annotated[int, "largest request body", ">=1"] = 8 << 20
    max_bodies: Annotated[int, "request bodies read at once (more get 429 before their body is "
                          "read): memory for bodies stays under max_bodies x max_body_bytes",
                          ">=1"] = 64
    max_connections: Annotated[int, "open connections (more get 503 from uvicorn at once)",
                               ">=1"] = 512
    max_request_tokens: Annotated[int, "most tokens in one request", ">=2"] = 65536
    served_model_name: Annotated[str, "the model id of the vLLM-compatible endpoints "
                                 "(/v1/models, /v1/completions)"] = "aligndistil-pi-star"
    log_level: Annotated[str, "logging level"] = "info"

    POLICY = "on"


@dataclass(kw_only=True)
class PrecomputeConfig(TeacherOptions, DatasetOptions):
    data: Annotated[str, "JSONL or Parquet file of examples, a dataset folder, or a Hub "
                    "dataset id (owner/name[@revision]; with --split, --data-config)"]
    out: Annotated[str, "the store to write (created, or resumed by the same command): a "
                   "folder, or s3://bucket/prefix (gs://, az:// untested)"]
    response_field: Annotated[str | None, "for preference rows {prompt, chosen, rejected}: "
                              "which list is the response (none: chosen)"] = None
    worker_index: Annotated[int | None, "this worker's index (none: $RANK under torchrun, "
                            "else 0)", ">=0"] = None
    num_workers: Annotated[int | None, "workers writing the store (none: $WORLD_SIZE under "
                           "torchrun, else 1)", ">=1"] = None
    shard_tokens: Annotated[int, "response tokens per committed shard (the unit of atomic "
                            "commit)", ">=1"] = 65536
    group_size: Annotated[int, "examples sorted and packed together per engine call", ">=1"] = 256
    skip_bad_rows: Annotated[bool, "skip and count malformed rows instead of stopping at the "
                             "first"] = False
    limit: Annotated[int | None, "only the first N examples", ">=1"] = None
    progress: Annotated[bool, "show a progress bar"] = True
    max_seq_len: Annotated[int | None, "longer examples are cut in the response, keeping its "
                           "EOS, and counted (none: 2048, the released scripts' length, or the "
                           "models' maximum if smaller)", ">=2"] = None

    layout: Annotated[Literal["compact", "compact-lossy8", "packed"], "how shards are encoded: "
                      "compact (lossless, the default); compact-lossy8 (log pi* as 8-bit codes "
                      "on each row's range; not with --tail-budget); packed (each position's "
                      "ids as a sorted set, log pi* as 8-bit log-spaced codes, float16 "
                      "scalars: the smallest, lossy, format version 4; "
                      "benchmarks/results/fidelity_per_byte.md)"] = "compact"
    overwrite: Annotated[bool, "delete the store at --out first (one worker only): to start "
                         "over after changing the data or the settings"] = False

    #: The released scripts' length, used when --max-seq-len is not given.
    DEFAULT_MAX_SEQ_LEN = 2048

    def validate(self) -> None:
        super().validate()
        from storage.store.layout import get_layout

        if self.tail_budget and not get_layout(self.layout).ragged_capable:
            raise ConfigError(f"--layout {self.layout} is not offered with --tail-budget "
                              f"(ragged shards): pick compact or packed")
        require_data(self.data, "--data")
        if self.overwrite and self.placement(os.environ)[1] > 1:
            raise ConfigError("--overwrite deletes the whole store: run it with one worker "
                              "(the other workers' shards would vanish under them)")
        if is_object_url(self.out):  # object storage: the store's own checks, when opened
            return
        refuse_output_on_inputs(self.out, {
            "--data": self.data, "--dpo-model": self.dpo_model,
            "--reverse-model": self.reverse_model, "--reference-model": self.reference_model})
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {self.out} is a file; give a store folder (new, or a store "
                              f"to resume)")
        if out.is_dir() and not (out / "zarr.json").is_file():
            others = sorted(e for e in os.listdir(out) if not SAVED_CONFIG.match(e))
            if others:
                raise ConfigError(f"--out {self.out} holds other files ({', '.join(others[:4])}) "
                                  f"and is not a store; give a new or empty folder")

    def placement(self, environ: dict[str, str]) -> tuple[int, int]:
        """``(worker_index, num_workers)``: the flags, else torchrun's RANK/WORLD_SIZE, else
        ``(0, 1)``."""
        index = self.worker_index if self.worker_index is not None \
            else int(environ.get("RANK", 0))
        count = self.num_workers if self.num_workers is not None \
            else int(environ.get("WORLD_SIZE", 1))
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"need 0 <= --worker-index < --num-workers, got {index} of "
                              f"{count}")
        return index, count
