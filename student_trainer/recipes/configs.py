"""The options of each recipe, written once: one dataclass per command.

Plain data (no torch import): ``aligndistil``'s command line, ``--config`` files and the configs
saved beside each run are generated from these fields (``Annotated[type, "help"] = default``).
Each recipe reads its own config top to bottom; ``validate`` refuses values that cannot make a
run, naming the flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from storage.errors import ConfigError

SECRET = "secret"  # the marker aligndistil.config looks for: never saved
RESUME = {"nargs": "?", "const": "latest"}  # argparse: a bare --resume means "latest"

Device = Literal["auto", "cpu", "cuda"]
Schedule = Literal["cosine", "linear", "constant"]


def check_sampling(config) -> None:
    """``temperature``, ``top_p`` and ``sampling_top_k`` of a sampling command."""
    if not config.temperature > 0 or config.temperature == float("inf"):
        raise ConfigError(f"--temperature must be > 0 and finite, got {config.temperature}")
    if not 0 < config.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {config.top_p}")
    if config.sampling_top_k < 0:
        raise ConfigError(f"--sampling-top-k must be >= 0 (0: off), got {config.sampling_top_k}")


@dataclass(kw_only=True)
class TrainConfig:
    """``aligndistil train``: AlignDistil, off-policy from a store or on-policy via a server."""
    mode: Annotated[Literal["off-policy", "on-policy"], "where the targets come from"]
    model: Annotated[str, "the initial student: a local Hugging Face folder (safetensors) whose "
                     "tokenizer matches the teachers'"]
    out: Annotated[str, "output folder: checkpoint-N/, final/, metrics.jsonl, tensorboard/, "
                   "training_curves.png"]
    # data: off-policy
    store: Annotated[str | None, "off-policy: the precomputed target store"] = None
    # data: on-policy
    teacher_url: Annotated[str | None, "on-policy: base URL of 'aligndistil serve', e.g. "
                           "http://127.0.0.1:8000"] = None
    prompts: Annotated[str | None, "on-policy: JSONL/Parquet of prompts ('prompt', 'messages' "
                       "or 'input_ids' rows)"] = None
    api_key: Annotated[str | None, "bearer token for the server (default: "
                       "$ALIGNDISTIL_API_KEY)", SECRET] = None
    top_k: Annotated[int | None, "on-policy: ask the server for this many top-k entries "
                     "(none: the server's)"] = None
    max_new_tokens: Annotated[int, "on-policy: longest sampled response (the released "
                              "scripts' 1024)"] = 1024
    max_prompt_len: Annotated[int, "on-policy: longer prompts keep their last tokens (cut "
                              "from the left, counted)"] = 1024
    rollout_batch_size: Annotated[int, "on-policy: prompts per generate call"] = 32
    temperature: Annotated[float, "on-policy: sampling temperature (1: the policy itself, which the loss "
                           "assumes)"] = 1.0
    top_p: Annotated[float, "nucleus sampling cut (1: off)"] = 1.0
    sampling_top_k: Annotated[int, "sample among the k likeliest tokens only (0: off)"] = 0
    rollout_backend: Annotated[Literal["hf", "vllm"], "sampler, temperature 1, no top-k/top-p: "
                               "hf = Hugging Face generate; vllm = an in-process vLLM engine "
                               "that gets the student's weights before every rollout (the "
                               "'vllm' extra; one process only)"] = "hf"
    async_rollouts: Annotated[bool, "sample and score step s+1 while step s trains (samples one "
                              "update stale; keeps a second copy of the student)"] = False
    max_seq_len: Annotated[int | None, "on-policy: prompt + response limit (none: the "
                           "server's)"] = None
    request_timeout: Annotated[float, "seconds per request"] = 300.0
    max_retries: Annotated[int, "retries on connection errors/429/503 before stopping"] = 6
    # the loss
    tail: Annotated[Literal["uniform", "bucket"], "how the teacher's mass outside its top-k is "
                    "modelled"] = "uniform"
    beta0: Annotated[float, "beta_t = beta0 / alpha_t"] = 0.1
    weighting: Annotated[Literal["alpha", "uniform"], "alpha: beta_t = beta0/alpha_t (released "
                         "code); uniform: beta0"] = "alpha"
    loss_chunk_size: Annotated[int | None, "compute the LM head + loss this many positions at a "
                               "time (memory O(chunk x V); one extra matmul)"] = None
    # optimisation (defaults: the paper's)
    lr: Annotated[float, "peak learning rate"] = 1e-6
    weight_decay: Annotated[float, "AdamW weight decay"] = 0.0
    adam_betas: Annotated[tuple[float, float], "AdamW betas"] = (0.9, 0.95)
    warmup_ratio: Annotated[float, "fraction of the steps spent warming up"] = 0.1
    lr_schedule: Annotated[Schedule, "decay after the warm-up"] = "cosine"
    min_lr_ratio: Annotated[float, "the decay ends at this fraction of --lr (the released "
                            "scripts' 0.1)"] = 0.1
    global_batch_size: Annotated[int, "sequences per optimizer step, over all ranks"] = 128
    max_tokens: Annotated[int, "padded tokens per micro-batch (gradient accumulation fills the "
                          "global batch)"] = 8192
    epochs: Annotated[int, "passes over the data"] = 1
    max_steps: Annotated[int | None, "stop after this many steps"] = None
    max_grad_norm: Annotated[float, "gradient clipping (0 disables it)"] = 1.0
    seed: Annotated[int, "seed of the data order, sampling and initialisation"] = 42
    # runtime
    device: Annotated[Device, "where the student trains"] = "auto"
    bf16: Annotated[Literal["auto", "on", "off"], "bf16 autocast (auto: on with CUDA); weights "
                    "stay float32"] = "auto"
    gradient_checkpointing: Annotated[bool, "recompute activations in backward"] = False
    save_every: Annotated[int, "checkpoint every N steps (0: only the final one)"] = 100
    save_total_limit: Annotated[int, "keep this many checkpoint-N folders (final/ is always "
                                "kept)"] = 2
    resume: Annotated[str | None, "continue from the newest checkpoint in --out (bare "
                      "--resume), or from the given checkpoint folder", RESUME] = None
    progress: Annotated[bool, "show a progress bar"] = True
    tensorboard: Annotated[bool, "write TensorBoard events"] = True
    trust_remote_code: Annotated[bool, "allow model code from the model folder"] = False
    log_level: Annotated[str, "logging level"] = "info"

    def validate(self) -> None:
        if self.mode == "off-policy" and not self.store:
            raise ConfigError("--mode off-policy needs --store")
        if self.mode == "on-policy" and not (self.teacher_url and self.prompts):
            raise ConfigError("--mode on-policy needs --teacher-url and --prompts")
        for name in ("global_batch_size", "max_tokens", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("--max-steps must be >= 1")
        check_sampling(self)


@dataclass(kw_only=True)
class DPOConfig:
    """``aligndistil dpo``: a teacher by sigmoid DPO (``--reverse``: the reverse teacher)."""
    model: Annotated[str, "the initial model (and the reference)"]
    data: Annotated[str, "preference pairs, JSONL/Parquet rows {'prompt', 'chosen': [messages], "
                    "'rejected': [messages]}"]
    out: Annotated[str, "where the trained model is saved"]
    reverse: Annotated[bool, "swap chosen and rejected (the reverse-DPO teacher)"] = False
    beta: Annotated[float, "the DPO beta (the paper's beta0)"] = 0.1
    lr: Annotated[float, "peak learning rate (the paper's 1e-6)"] = 1e-6
    weight_decay: Annotated[float, "AdamW weight decay"] = 0.0
    warmup_ratio: Annotated[float, "fraction of the steps spent warming up"] = 0.1
    lr_schedule: Annotated[Schedule, "decay after the warm-up"] = "cosine"
    min_lr_ratio: Annotated[float, "the decay ends at this fraction of --lr (the released "
                            "scripts' 0.1)"] = 0.1
    batch_size: Annotated[int, "pairs per optimizer step (the paper's 128)"] = 128
    max_tokens: Annotated[int, "padded tokens per micro-batch (chosen + rejected)"] = 4096
    epochs: Annotated[int, "passes over the pairs"] = 1
    max_steps: Annotated[int | None, "stop after this many steps"] = None
    max_grad_norm: Annotated[float, "gradient clipping (0 disables it)"] = 1.0
    max_seq_len: Annotated[int, "longer pairs are cut in the response, keeping its EOS "
                           "(counted)"] = 2048
    seed: Annotated[int, "seed of the data order"] = 42
    device: Annotated[Device, "where the model trains"] = "auto"
    progress: Annotated[bool, "show a progress bar"] = True
    trust_remote_code: Annotated[bool, "allow model code from the model folder"] = False
    log_level: Annotated[str, "logging level"] = "info"

    def validate(self) -> None:
        pass


@dataclass(kw_only=True)
class SFTConfig:
    """``aligndistil sft``: cross-entropy on the assistant's response tokens."""
    model: Annotated[str, "the initial model"]
    data: Annotated[str, "chat demonstrations: {'messages': [...]} or prompt/response rows"]
    out: Annotated[str, "where the fine-tuned model is saved"]
    lr: Annotated[float, "peak learning rate"] = 1e-5
    batch_size: Annotated[int, "examples per optimizer step"] = 64
    epochs: Annotated[int, "passes over the data"] = 1
    max_steps: Annotated[int | None, "stop after this many steps"] = None
    warmup_ratio: Annotated[float, "fraction of the steps spent warming up"] = 0.05
    lr_schedule: Annotated[Schedule, "decay after the warm-up"] = "cosine"
    weight_decay: Annotated[float, "AdamW weight decay"] = 0.0
    max_grad_norm: Annotated[float, "gradient clipping (0 disables it)"] = 1.0
    max_seq_len: Annotated[int, "longer responses are cut"] = 1024
    seed: Annotated[int, "seed of the data order and initialisation"] = 42
    device: Annotated[Device, "where the model trains"] = "auto"
    progress: Annotated[bool, "show a progress bar"] = True
    log_level: Annotated[str, "logging level"] = "info"

    def validate(self) -> None:
        pass


@dataclass(kw_only=True)
class EvalConfig:
    """``aligndistil eval``: sample a model on prompts and measure the samples."""
    model: Annotated[str, "the model to evaluate"]
    prompts: Annotated[str, "JSONL/Parquet rows with 'prompt' or 'messages'"]
    out: Annotated[str | None, "write the JSON here too"] = None
    teacher_url: Annotated[str | None, "a running 'aligndistil serve': contrastive reward and "
                           "KL to the dpo teacher"] = None
    api_key: Annotated[str | None, "bearer token (default: $ALIGNDISTIL_API_KEY)", SECRET] = None
    task: Annotated[str | None, "score with this task's gold reward (a registered task, e.g. "
                    "sort)"] = None
    samples_per_prompt: Annotated[int, "samples per prompt"] = 1
    max_new_tokens: Annotated[int, "longest sampled response"] = 64
    batch_size: Annotated[int, "prompts per generate call"] = 256
    temperature: Annotated[float, "sampling temperature (1: the policy itself, which the loss "
                           "assumes)"] = 1.0
    top_p: Annotated[float, "nucleus sampling cut (1: off)"] = 1.0
    sampling_top_k: Annotated[int, "sample among the k likeliest tokens only (0: off)"] = 0
    samples_out: Annotated[str | None, "write every sample here (JSONL: prompt, response text, "
                           "response token ids, gold reward with --task)"] = None
    beta0: Annotated[float, "the contrastive reward's beta0"] = 0.1
    seed: Annotated[int, "sampling seed"] = 1234
    device: Annotated[Device, "where the model runs"] = "auto"
    examples: Annotated[int, "samples included verbatim in the JSON"] = 5
    log_level: Annotated[str, "logging level"] = "info"

    def validate(self) -> None:
        if self.samples_per_prompt < 1:
            raise ConfigError("--samples-per-prompt must be at least 1")
        check_sampling(self)


@dataclass(kw_only=True)
class RewardAccuracyConfig:
    """``aligndistil reward-accuracy``: how often each reward ranks chosen above rejected
    (the paper's Table 2)."""
    dpo_model: Annotated[str, "the DPO-trained teacher"]
    reverse_model: Annotated[str, "the reverse-DPO teacher"]
    reference_model: Annotated[str, "the reference (SFT) model both were trained from"]
    train_pairs: Annotated[str | None, "preference pairs the teachers were trained on"] = None
    test_pairs: Annotated[str | None, "held-out preference pairs"] = None
    beta0: Annotated[float, "the teachers' DPO beta (scales both rewards)"] = 0.1
    max_seq_len: Annotated[int, "longer pairs are cut in the response, keeping its EOS"] = 2048
    max_tokens: Annotated[int, "padded tokens per forward pass"] = 4096
    out: Annotated[str | None, "write the JSON here too"] = None
    device: Annotated[Device, "where the models run"] = "auto"
    progress: Annotated[bool, "show a progress bar"] = True
    trust_remote_code: Annotated[bool, "allow model code from the model folders"] = False
    log_level: Annotated[str, "logging level"] = "info"

    def validate(self) -> None:
        if not (self.train_pairs or self.test_pairs):
            raise ConfigError("give --train-pairs, --test-pairs or both")
