"""The options of each recipe, written once: one dataclass per command.

Plain data (no torch import): ``aligndistil``'s command line, ``--config`` files and the configs
saved beside each run are generated from these fields (``Annotated[type, "help"] = default``).
Each recipe reads its own config top to bottom; ``validate`` refuses values that cannot make a
run, naming the flag.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Literal

from causal_lm.options import AttentionOptions
from storage.datasets import DatasetOptions, require_data
from storage.hub import HubOptions
from storage.errors import ConfigError
from storage.outputs import (refuse_folder_as_file, refuse_output_on_inputs, refuse_used_folder,
                             require_file)
from student_trainer.trackers import parse_report_to

SECRET = "secret"  # the marker aligndistil.config looks for: never saved
RESUME = {"nargs": "?", "const": "latest"}  # argparse: a bare --resume means "latest"

Device = Literal["auto", "cpu", "cuda"]
ReportTo = Annotated[str, "where metrics go besides metrics.jsonl: a comma-separated list of "
                     "tensorboard, wandb, mlflow, or none (W&B and MLflow read their own "
                     "environment variables: WANDB_PROJECT, WANDB_MODE, MLFLOW_TRACKING_URI, "
                     "MLFLOW_EXPERIMENT_NAME, ...)"]
Schedule = Literal["cosine", "linear", "constant"]


class JoinRepeated(argparse.Action):
    """A flag that may be repeated: ``--teacher-url A --teacher-url B`` is ``"A,B"``."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, f"{before},{values}" if before else values)


#: How ``--teacher-url`` takes several servers (argparse keywords for the field).
SEVERAL_URLS = {"action": JoinRepeated}


def refuse_flash_without_bf16(config) -> None:
    """FlashAttention kernels take half precision only, and the student's float32 weights reach
    them in bf16 only under autocast: ``--bf16 off`` with one could only fail at the first
    forward on the GPU."""
    kernel = getattr(config, "attn_implementation", None) or ""
    if "flash" in kernel and config.bf16 == "off":
        raise ConfigError(f"--attn-implementation {kernel} runs in half precision only; keep "
                          f"--bf16 auto or on (the weights stay float32)")


@dataclass(kw_only=True)
class SamplingOptions:
    """How a command samples responses (train on-policy, eval, pairs): exactly these settings
    and nothing from the model's generation_config.json."""
    temperature: Annotated[float, "sampling temperature (1: the policy itself, which the "
                           "AlignDistil loss assumes)", ">0"] = 1.0
    top_p: Annotated[float, "nucleus sampling cut (1: off)", "(0,1]"] = 1.0
    sampling_top_k: Annotated[int, "sample among the k likeliest tokens only (0: off)", ">=0"] = 0


def check_sampling(config: SamplingOptions) -> None:
    """The sampling settings of a config built in code (the command line checks them when
    parsing)."""
    if not 0 < config.temperature < float("inf"):
        raise ConfigError(f"--temperature must be > 0 and finite, got {config.temperature}")
    if not 0 < config.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {config.top_p}")
    if config.sampling_top_k < 0:
        raise ConfigError(f"--sampling-top-k must be >= 0 (0: off), got {config.sampling_top_k}")


@dataclass(kw_only=True)
class TrainConfig(SamplingOptions, DatasetOptions, HubOptions, AttentionOptions):
    """``aligndistil train``: AlignDistil, off-policy from a store or on-policy via a server."""
    MODEL_FIELDS = ("model",)
    mode: Annotated[Literal["off-policy", "on-policy"], "where the targets come from"]
    model: Annotated[str, "the initial student: a Hugging Face folder (safetensors) or Hub id "
                     "(owner/name[@revision]) whose tokenizer matches the teachers'"]
    out: Annotated[str, "output folder: checkpoint-N/, final/, metrics.jsonl, tensorboard/, "
                   "training_curves.png, trackers.json"]
    # data: off-policy
    store: Annotated[str | None, "off-policy: the precomputed target store"] = None
    # data: on-policy
    teacher_url: Annotated[str | None, "on-policy: base URL of 'aligndistil serve', e.g. "
                           "http://127.0.0.1:8000; several servers: repeat the flag, or "
                           "separate the URLs by commas", SEVERAL_URLS] = None
    prompts: Annotated[str | None, "on-policy: prompts ('prompt', 'messages' or 'input_ids' "
                       "rows): JSONL/Parquet, a dataset folder or a Hub dataset id"] = None
    api_key: Annotated[str | None, "bearer token for the server (default: "
                       "$ALIGNDISTIL_API_KEY)", SECRET] = None
    top_k: Annotated[int | None, "on-policy: ask the server for this many top-k entries "
                     "(none: the server's)", ">=1"] = None
    student_top: Annotated[int, "on-policy: also score the student's own top N ids at each "
                           "response position (one no-grad pass per step) and train on the "
                           "union with the teacher's kept ids; 0: off (docs/training.md)",
                           ">=0"] = 0
    max_new_tokens: Annotated[int, "on-policy: longest sampled response (the released "
                              "scripts' 1024)", ">=1"] = 1024
    max_prompt_len: Annotated[int, "on-policy: longer prompts keep their last tokens (cut "
                              "from the left, counted)", ">=1"] = 1024
    rollout_batch_size: Annotated[int, "on-policy: prompts per generate call", ">=1"] = 32
    rollout_backend: Annotated[Literal["hf", "vllm"], "sampler, temperature 1, no top-k/top-p: "
                               "hf = Hugging Face generate; vllm = an in-process vLLM engine "
                               "per rank that gets the student's weights before every rollout "
                               "(the 'vllm' extra)"] = "hf"
    vllm_gpu_memory: Annotated[float, "--rollout-backend vllm on a GPU: the share of each "
                               "rank's GPU its engine takes (weights and KV cache)",
                               ">0"] = 0.3
    vllm_sleep: Annotated[bool, "--rollout-backend vllm on a GPU: the engine sleeps between a "
                          "rollout and the next weight sync (vLLM's sleep mode, level 1), "
                          "freeing its KV cache and weights' GPU memory while training; "
                          "needs --max-staleness 0 (untested here: no GPU)"] = False
    max_staleness: Annotated[int, "on-policy: sample and score steps s+1..s+S while step s "
                             "trains, from weights S updates old (0: synchronous; keeps S "
                             "copies of the student's weights, and with hf one more model)",
                             ">=0"] = 0
    async_rollouts: Annotated[bool, "the same as --max-staleness 1 (kept for older "
                              "commands)"] = False
    save_samples: Annotated[bool, "on-policy: each rank appends what it sampled to "
                            "OUT/samples/rank-R.jsonl (step, staleness, ids; after a resume the "
                            "last line of a (step, rank, index) wins)"] = False
    max_seq_len: Annotated[int | None, "on-policy: prompt + response limit (none: the "
                           "server's)", ">=2"] = None
    request_timeout: Annotated[float, "seconds per request", ">0"] = 300.0
    max_retries: Annotated[int, "retries on connection errors/429/503 before stopping", ">=0"] = 6
    # the loss
    objective: Annotated[Literal["aligndistil", "reinforce-sentence", "reinforce-token"],
                         "aligndistil: the distillation loss; reinforce-sentence / "
                         "reinforce-token: the paper's Figure 2 baselines, REINFORCE on the "
                         "contrastive reward with a KL penalty to pi_dpo (on-policy only; "
                         "student_trainer/reinforce.py)"] = "aligndistil"
    kl_coef: Annotated[float, "reinforce-*: beta, the weight of the KL penalty to pi_dpo (the "
                       "paper's Figure 2: 0.08)", ">=0"] = 0.08
    tail: Annotated[Literal["auto", "uniform", "bucket"], "how the teacher's mass outside its "
                    "kept ids is modelled (auto: bucket, the student's mass outside the kept "
                    "ids as one category; docs/training.md)"] = "auto"
    beta0: Annotated[float, "beta_t = beta0 / alpha_t", ">0"] = 0.1
    weighting: Annotated[Literal["alpha", "uniform"], "alpha: beta_t = beta0/alpha_t (released "
                         "code); uniform: beta0"] = "alpha"
    loss_chunk_size: Annotated[int | None, "compute the LM head + loss this many positions at a "
                               "time (memory O(chunk x V); one extra matmul)", ">=1"] = None
    # optimisation (defaults: the paper's)
    lr: Annotated[float, "peak learning rate", ">0"] = 1e-6
    weight_decay: Annotated[float, "AdamW weight decay", ">=0"] = 0.0
    adam_betas: Annotated[tuple[float, float], "AdamW betas", "[0,1)"] = (0.9, 0.95)
    warmup_ratio: Annotated[float, "fraction of the steps spent warming up", "[0,1]"] = 0.1
    lr_schedule: Annotated[Schedule, "decay after the warm-up"] = "cosine"
    min_lr_ratio: Annotated[float, "the decay ends at this fraction of --lr (the released "
                            "scripts' 0.1)", "[0,1]"] = 0.1
    global_batch_size: Annotated[int, "sequences per optimizer step, over all ranks", ">=1"] = 128
    max_tokens: Annotated[int, "tokens per micro-batch, padding included (gradient "
                          "accumulation fills the global batch)", ">=2"] = 8192
    packing: Annotated[Literal["auto", "on", "off"], "padding-free micro-batches, sequences "
                       "packed back to back (auto: when a probe shows the model keeps packed "
                       "sequences apart; on: refuse a model that does not)"] = "auto"
    epochs: Annotated[int, "passes over the data", ">=1"] = 1
    max_steps: Annotated[int | None, "stop after this many steps", ">=1"] = None
    max_grad_norm: Annotated[float, "gradient clipping (0 disables it)", ">=0"] = 1.0
    seed: Annotated[int, "seed of the data order, sampling and initialisation"] = 42
    # runtime
    device: Annotated[Device, "where the student trains"] = "auto"
    strategy: Annotated[Literal["ddp", "fsdp"], "how torchrun's processes share the student: "
                        "ddp = a whole copy each (16 bytes/parameter per rank); fsdp = FSDP2, "
                        "parameters, gradients and AdamW states sharded over the ranks (one "
                        "process is a world of one, e.g. to resume a sharded run there; "
                        "docs/training.md, 'Strategy')"] = "ddp"
    fsdp_sampling: Annotated[Literal["per-layer", "gathered"], "on-policy with --strategy "
                             "fsdp: per-layer = each decoder layer gathered for each new token "
                             "(fits whatever fits training); gathered = the whole student "
                             "gathered once per rollout call (its weights must fit each GPU; "
                             "much faster, benchmarks/results/fsdp.md)"] = "per-layer"
    bf16: Annotated[Literal["auto", "on", "off"], "bf16 autocast (auto: on with CUDA); weights "
                    "stay float32"] = "auto"
    gradient_checkpointing: Annotated[bool, "recompute activations in backward"] = False
    save_every: Annotated[int, "checkpoint every N steps (0: only the final one)", ">=0"] = 100
    save_total_limit: Annotated[int, "keep this many checkpoint-N folders (final/ is always "
                                "kept)", ">=0"] = 2
    resume: Annotated[str | None, "continue from the newest checkpoint in --out (bare "
                      "--resume), or from the given checkpoint folder; the run's saved settings "
                      "must not change", RESUME] = None
    overwrite: Annotated[bool, "start over in an --out that holds another run (its files are "
                         "deleted)"] = False
    allow_incomplete: Annotated[bool, "train on a store some precompute workers have not "
                                "finished (default: refuse)"] = False
    progress: Annotated[bool, "show a progress bar"] = True
    report_to: ReportTo = "tensorboard"
    trust_remote_code: Annotated[bool, "allow model code from the model folder"] = False
    log_level: Annotated[str, "logging level"] = "info"

    @property
    def staleness(self) -> int:
        """The most updates a step's samples may lag its weights (``--async-rollouts`` is 1)."""
        return max(self.max_staleness, 1 if self.async_rollouts else 0)

    def validate(self) -> None:
        refuse_flash_without_bf16(self)
        if self.mode == "off-policy" and not self.store:
            raise ConfigError("--mode off-policy needs --store")
        if self.mode == "on-policy" and not (self.teacher_url and self.prompts):
            raise ConfigError("--mode on-policy needs --teacher-url and --prompts")
        if self.mode == "off-policy":
            unused = [flag for flag, given in (
                ("--teacher-url", self.teacher_url), ("--prompts", self.prompts),
                ("--top-k", self.top_k is not None), ("--max-seq-len", self.max_seq_len),
                ("--async-rollouts", self.async_rollouts),
                ("--max-staleness", self.max_staleness),
                ("--save-samples", self.save_samples),
                ("--student-top", self.student_top),
                ("--rollout-backend", self.rollout_backend != "hf")) if given]
            if unused:
                raise ConfigError(f"{', '.join(unused)} only apply to --mode on-policy (the "
                                  f"off-policy targets come from --store)")
        if self.fsdp_sampling != "per-layer" and not (self.strategy == "fsdp"
                                                      and self.mode == "on-policy"):
            raise ConfigError("--fsdp-sampling only applies to --mode on-policy with --strategy "
                              "fsdp")
        if self.async_rollouts and self.max_staleness > 1:
            raise ConfigError(f"--async-rollouts is --max-staleness 1; it contradicts "
                              f"--max-staleness {self.max_staleness}: drop it")
        if (self.vllm_sleep or self.vllm_gpu_memory != 0.3) and self.rollout_backend != "vllm":
            raise ConfigError("--vllm-sleep and --vllm-gpu-memory apply to --rollout-backend "
                              "vllm")
        if self.vllm_gpu_memory >= 1:
            raise ConfigError(f"--vllm-gpu-memory {self.vllm_gpu_memory}: a share of the GPU, "
                              f"below 1 (the trainer needs the rest)")
        if self.vllm_sleep and self.staleness:
            raise ConfigError("--vllm-sleep frees the engine's memory while training, but with "
                              "--max-staleness (or --async-rollouts) the engine samples while "
                              "training runs: drop one")
        if self.strategy == "fsdp" and self.staleness and self.rollout_backend == "hf":
            raise ConfigError("--max-staleness (or --async-rollouts) with --rollout-backend hf "
                              "samples from a whole copy of the student in a background thread; "
                              "--strategy fsdp keeps only shards: use --rollout-backend vllm, "
                              "or drop one")
        if self.student_top and self.objective != "aligndistil":
            raise ConfigError(f"--student-top applies to --objective aligndistil (the loss on the "
                              f"teacher's ids); --objective {self.objective} never reads them")
        if self.objective != "aligndistil" and self.mode != "on-policy":
            raise ConfigError(f"--objective {self.objective} is a policy gradient and needs "
                              f"samples from the student: use --mode on-policy")
        if self.mode == "on-policy" and self.store:
            raise ConfigError("--store only applies to --mode off-policy (on-policy targets "
                              "come from --teacher-url)")
        # Resuming, --model may be one of the run's own checkpoints, inside --out.
        refuse_output_on_inputs(self.out, {"--model": None if self.resume else self.model,
                                           "--store": self.store, "--prompts": self.prompts})
        if self.mode == "on-policy":
            require_data(self.prompts, "--prompts")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite deletes it: "
                              "give one of them")
        if self.resume:
            self._check_resume()
        else:
            refuse_used_folder(self.out, own=(SAVED_CONFIG["train"],), resume=True,
                               overwrite=self.overwrite)
        for name in ("global_batch_size", "max_tokens", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("--max-steps must be >= 1")
        check_sampling(self)
        parse_report_to(self.report_to)

    def _check_resume(self) -> None:
        check_resume(self, "train", RESUME_FIXED)


def check_resume(config, command: str, fixed: tuple[str, ...]) -> None:
    """--resume continues the run saved in ``config.out``: a setting among ``fixed`` (those that
    change its math or data) that differs is refused, with the list of differences."""
    import yaml

    path = Path(config.out) / SAVED_CONFIG[command]
    if not path.is_file():
        return
    saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    diffs = []
    defaults = {f.name: f.default for f in fields(config)}
    for name in fixed:
        # A run saved before a field existed ran with its default.
        old, new = saved.get(name, defaults[name]), getattr(config, name)
        new = list(new) if isinstance(new, tuple) else new
        if isinstance(old, (int, float)) and isinstance(new, (int, float)) \
                and not isinstance(old, bool) and float(old) == float(new):
            continue
        if old != new:
            diffs.append(f"--{name.replace('_', '-')} {old!r} -> {new!r}")
    if diffs:
        raise ConfigError(f"--resume: {config.out} was started with other settings "
                          f"({'; '.join(diffs)}); resume the same run with `aligndistil "
                          f"{command} --config {path} --resume`, or start a new --out")


def public_values(config) -> dict:
    """The config's fields as a dict, secrets (``SECRET`` in the field's annotation) left out:
    what the trackers log."""
    import typing

    hints = typing.get_type_hints(type(config), include_extras=True)
    return {f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
            for f in fields(config) if SECRET not in getattr(hints[f.name], "__metadata__", ())}


@dataclass(kw_only=True)
class ConsolidateConfig:
    """``aligndistil consolidate``: a Hugging Face folder from a sharded (FSDP) checkpoint."""
    checkpoint: Annotated[str, "a checkpoint folder of 'train --strategy fsdp' (it holds "
                          "distributed/, config.json and the tokenizer)"]
    out: Annotated[str, "the Hugging Face folder to write (new or empty)"]
    trust_remote_code: Annotated[bool, "allow model code from the checkpoint folder"] = False
    log_level: Annotated[str, "logging level"] = "info"

    def validate(self) -> None:
        checkpoint = Path(self.checkpoint)
        if not (checkpoint / "distributed" / ".metadata").is_file():
            raise ConfigError(f"--checkpoint {self.checkpoint}: no distributed/.metadata; not a "
                              f"sharded checkpoint (a DDP checkpoint is already a Hugging Face "
                              f"folder)")
        if not (checkpoint / "config.json").is_file():
            raise ConfigError(f"--checkpoint {self.checkpoint}: no config.json")
        refuse_output_on_inputs(self.out, {"--checkpoint": self.checkpoint})
        refuse_used_folder(self.out)


#: The file each command saves its resolved config to (inside its --out folder).
SAVED_CONFIG = {"train": "train_config.yaml", "dpo": "dpo_config.yaml", "sft": "sft_config.yaml"}

#: TrainConfig fields that shape a run's math or data: --resume refuses to change them.
RESUME_FIXED = (
    "mode", "model", "store", "prompts", "top_k", "max_new_tokens", "max_prompt_len",
    "rollout_batch_size", "temperature", "top_p", "sampling_top_k", "rollout_backend",
    "async_rollouts", "max_staleness", "student_top", "max_seq_len", "objective", "kl_coef",
    "tail", "beta0", "weighting", "loss_chunk_size", "lr", "weight_decay", "adam_betas",
    "warmup_ratio", "lr_schedule", "min_lr_ratio", "global_batch_size", "max_tokens", "epochs",
    "max_steps", "max_grad_norm",
    "seed", "bf16", "allow_incomplete", "split", "data_config", "strategy")


@dataclass(kw_only=True)
class DPOConfig(DatasetOptions, HubOptions, AttentionOptions):
    """``aligndistil dpo``: a teacher by sigmoid DPO (``--reverse``: the reverse teacher)."""
    MODEL_FIELDS = ("model",)
    model: Annotated[str, "the initial model (and the reference)"]
    data: Annotated[str, "preference pairs, rows {'prompt', 'chosen': [messages], 'rejected': "
                    "[messages]}: JSONL/Parquet, a dataset folder or a Hub dataset id"]
    out: Annotated[str, "where the trained model is saved"]
    reverse: Annotated[bool, "swap chosen and rejected (the reverse-DPO teacher)"] = False
    beta: Annotated[float, "the DPO beta (the paper's beta0)", ">0"] = 0.1
    lr: Annotated[float, "peak learning rate (the paper's 1e-6)", ">0"] = 1e-6
    weight_decay: Annotated[float, "AdamW weight decay", ">=0"] = 0.0
    warmup_ratio: Annotated[float, "fraction of the steps spent warming up", "[0,1]"] = 0.1
    lr_schedule: Annotated[Schedule, "decay after the warm-up"] = "cosine"
    min_lr_ratio: Annotated[float, "the decay ends at this fraction of --lr (the released "
                            "scripts' 0.1)", "[0,1]"] = 0.1
    batch_size: Annotated[int, "pairs per optimizer step (the paper's 128)", ">=1"] = 128
    max_tokens: Annotated[int, "padded tokens per micro-batch (chosen + rejected)", ">=2"] = 4096
    epochs: Annotated[int, "passes over the pairs", ">=1"] = 1
    max_steps: Annotated[int | None, "stop after this many steps", ">=1"] = None
    max_grad_norm: Annotated[float, "gradient clipping (0 disables it)", ">=0"] = 1.0
    max_seq_len: Annotated[int, "longer pairs are cut in the response, keeping its EOS "
                           "(counted)", ">=2"] = 2048
    seed: Annotated[int, "seed of the data order"] = 42
    device: Annotated[Device, "where the model trains"] = "auto"
    strategy: Annotated[Literal["ddp", "fsdp"], "how torchrun's processes share the model: "
                        "ddp = a whole copy each; fsdp = FSDP2, parameters, gradients and AdamW "
                        "states sharded over the ranks (docs/training.md, 'Strategy')"] = "ddp"
    gradient_checkpointing: Annotated[bool, "recompute activations in backward"] = False
    bf16: Annotated[Literal["auto", "on", "off"], "bf16 autocast for the forward passes, the "
                    "reference log-probs' included (auto: on with CUDA); weights stay float32, "
                    "log-softmax in float32"] = "auto"
    progress: Annotated[bool, "show a progress bar"] = True
    trust_remote_code: Annotated[bool, "allow model code from the model folder"] = False
    report_to: ReportTo = "tensorboard"
    save_every: Annotated[int, "checkpoint every N steps into OUT/checkpoint-N/ (0: none; the "
                          "model is always saved into --out at the end)", ">=0"] = 0
    save_total_limit: Annotated[int, "keep this many checkpoint-N folders", ">=0"] = 2
    resume: Annotated[str | None, "continue from the newest checkpoint in --out (bare "
                      "--resume), or from the given checkpoint folder; the run's saved settings "
                      "must not change", RESUME] = None
    log_level: Annotated[str, "logging level"] = "info"
    overwrite: Annotated[bool, "replace what another run left in --out"] = False

    def validate(self) -> None:
        refuse_flash_without_bf16(self)
        parse_report_to(self.report_to)
        require_data(self.data, "--data")
        refuse_output_on_inputs(self.out, {"--model": self.model, "--data": self.data})
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite deletes it: "
                              "give one of them")
        if self.resume:
            check_resume(self, "dpo", DPO_RESUME_FIXED)
        else:
            refuse_used_folder(self.out, own=(SAVED_CONFIG["dpo"],), resume=True,
                               overwrite=self.overwrite)


#: DPOConfig fields that shape a run's math or data: --resume refuses to change them.
DPO_RESUME_FIXED = ("model", "data", "split", "data_config", "reverse", "beta", "lr",
                    "weight_decay", "warmup_ratio", "lr_schedule", "min_lr_ratio", "batch_size",
                    "max_tokens", "epochs", "max_steps", "max_grad_norm", "max_seq_len", "seed",
                    "strategy", "bf16")


@dataclass(kw_only=True)
class SFTConfig(DatasetOptions, HubOptions, AttentionOptions):
    """``aligndistil sft``: cross-entropy on the assistant's response tokens."""
    MODEL_FIELDS = ("model",)
    model: Annotated[str, "the initial model"]
    data: Annotated[str, "chat demonstrations: {'messages': [...]} or prompt/response rows"]
    out: Annotated[str, "where the fine-tuned model is saved"]
    lr: Annotated[float, "peak learning rate", ">0"] = 1e-5
    batch_size: Annotated[int, "examples per optimizer step", ">=1"] = 64
    epochs: Annotated[int, "passes over the data", ">=1"] = 1
    max_steps: Annotated[int | None, "stop after this many steps", ">=1"] = None
    warmup_ratio: Annotated[float, "fraction of the steps spent warming up", "[0,1]"] = 0.05
    lr_schedule: Annotated[Schedule, "decay after the warm-up"] = "cosine"
    weight_decay: Annotated[float, "AdamW weight decay", ">=0"] = 0.0
    max_grad_norm: Annotated[float, "gradient clipping (0 disables it)", ">=0"] = 1.0
    max_seq_len: Annotated[int, "longer responses are cut", ">=2"] = 1024
    seed: Annotated[int, "seed of the data order and initialisation"] = 42
    device: Annotated[Device, "where the model trains"] = "auto"
    progress: Annotated[bool, "show a progress bar"] = True
    report_to: ReportTo = "tensorboard"
    log_level: Annotated[str, "logging level"] = "info"
    overwrite: Annotated[bool, "replace what another run left in --out"] = False

    def validate(self) -> None:
        parse_report_to(self.report_to)
        require_data(self.data, "--data")
        refuse_output_on_inputs(self.out, {"--model": self.model, "--data": self.data})
        refuse_used_folder(self.out, own=(SAVED_CONFIG["sft"],), overwrite=self.overwrite)


@dataclass(kw_only=True)
class EvalConfig(SamplingOptions, DatasetOptions, HubOptions, AttentionOptions):
    """``aligndistil eval``: sample a model on prompts and measure the samples."""
    MODEL_FIELDS = ("model",)
    model: Annotated[str, "the model to evaluate"]
    prompts: Annotated[str, "rows with 'prompt' or 'messages': JSONL/Parquet, a dataset folder "
                       "or a Hub dataset id"]
    out: Annotated[str | None, "write the JSON here too"] = None
    teacher_url: Annotated[str | None, "a running 'aligndistil serve': contrastive reward and "
                           "KL to the dpo teacher (several: repeat the flag, or separate the "
                           "URLs by commas)", SEVERAL_URLS] = None
    api_key: Annotated[str | None, "bearer token (default: $ALIGNDISTIL_API_KEY)", SECRET] = None
    task: Annotated[str | None, "score with this task's gold reward (a registered task, e.g. "
                    "sort)"] = None
    samples_per_prompt: Annotated[int, "samples per prompt", ">=1"] = 1
    max_new_tokens: Annotated[int, "longest sampled response", ">=1"] = 64
    batch_size: Annotated[int, "prompts per generate call", ">=1"] = 256
    samples_out: Annotated[str | None, "write every sample here (JSONL: prompt, response text, "
                           "response token ids, gold reward with --task)"] = None
    beta0: Annotated[float, "the contrastive reward's beta0", ">0"] = 0.1
    seed: Annotated[int, "sampling seed"] = 1234
    device: Annotated[Device, "where the model runs"] = "auto"
    examples: Annotated[int, "samples included verbatim in the JSON", ">=0"] = 5
    log_level: Annotated[str, "logging level"] = "info"

    def validate(self) -> None:
        if self.samples_per_prompt < 1:
            raise ConfigError("--samples-per-prompt must be at least 1")
        check_sampling(self)
        require_data(self.prompts, "--prompts")
        inputs = {"--model": self.model, "--prompts": self.prompts}
        for flag, path in (("--out", self.out), ("--samples-out", self.samples_out)):
            refuse_folder_as_file(path, flag)
            if path:
                refuse_output_on_inputs(path, inputs, out_flag=flag)
        if self.out and self.samples_out and Path(self.out).resolve() == \
                Path(self.samples_out).resolve():
            raise ConfigError("--out and --samples-out name the same file")


@dataclass(kw_only=True)
class RewardAccuracyConfig(HubOptions, AttentionOptions):
    """``aligndistil reward-accuracy``: how often each reward ranks chosen above rejected
    (the paper's Table 2)."""
    MODEL_FIELDS = ("dpo_model", "reverse_model", "reference_model")
    dpo_model: Annotated[str, "the DPO-trained teacher"]
    reverse_model: Annotated[str, "the reverse-DPO teacher"]
    reference_model: Annotated[str, "the reference (SFT) model both were trained from"]
    train_pairs: Annotated[str | None, "preference pairs the teachers were trained on"] = None
    test_pairs: Annotated[str | None, "held-out preference pairs"] = None
    beta0: Annotated[float, "the teachers' DPO beta (scales both rewards)", ">0"] = 0.1
    max_seq_len: Annotated[int, "longer pairs are cut in the response, keeping its EOS",
                           ">=2"] = 2048
    max_tokens: Annotated[int, "padded tokens per forward pass", ">=2"] = 4096
    out: Annotated[str | None, "write the JSON here too"] = None
    device: Annotated[Device, "where the models run"] = "auto"
    progress: Annotated[bool, "show a progress bar"] = True
    trust_remote_code: Annotated[bool, "allow model code from the model folders"] = False
    log_level: Annotated[str, "logging level"] = "info"

    def validate(self) -> None:
        if not (self.train_pairs or self.test_pairs):
            raise ConfigError("give --train-pairs, --test-pairs or both")
        require_file(self.train_pairs, "--train-pairs")
        require_file(self.test_pairs, "--test-pairs")
        refuse_folder_as_file(self.out, "--out")
        if self.out:
            refuse_output_on_inputs(self.out, {
                "--dpo-model": self.dpo_model, "--reverse-model": self.reverse_model,
                "--reference-model": self.reference_model, "--train-pairs": self.train_pairs,
                "--test-pairs": self.test_pairs})
