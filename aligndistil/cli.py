"""``aligndistil`` — one console command; every subcommand is a config dataclass and a function.

:data:`COMMANDS` lists them: each names its config (a dataclass in a light module: building the
parser never imports torch, so ``aligndistil --help`` is instant), the function that runs it
(imported only when the command runs), where the resolved config is saved, and how its result
is summed up in one line. Flags, ``--config FILE`` and the saved YAML all come from the config
(:mod:`aligndistil.config`).

Errors: a :class:`~storage.errors.UserError` raised anywhere below is caught here, once, and
printed as ``aligndistil: error: <message>`` with exit status 2. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from aligndistil import config as cfg
from aligndistil.worlds.toy.build import SAVED_CONFIG as TOYWORLD_SAVED_CONFIG
from student_trainer.recipes.configs import SAVED_CONFIG
from storage.errors import UserError


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------- summaries
def _train_line(result: dict) -> str:
    last = result.get("last") or {}
    figures = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "kl", "alpha_mean")
                        if isinstance(last.get(k), (int, float)))
    cut = result.get("prompts_truncated")
    return (f"done: {result.get('steps')} steps; model saved to {result['final']}"
            + (f"; last step: {figures}" if figures else "")
            + (f"; {cut} prompts cut to --max-prompt-len" if cut else ""))


def _dpo_line(result: dict) -> str:
    cut = result.get("truncated_sequences")
    return (f"done: {result['steps']} steps on {result['pairs']} pairs"
            f"{f' ({cut} sequences cut to --max-seq-len)' if cut else ''}"
            f"{' (reverse)' if result['reverse'] else ''}; preference accuracy "
            f"{result['preference_accuracy']:.3f}; log-prob ranking "
            f"{result['logprob_accuracy_before']:.3f} -> {result['logprob_accuracy_after']:.3f}")


def _precompute_lines(result: dict) -> str:
    from storage.store.summary import format_alpha

    s, wall = result["summary"], max(result["seconds"], 1e-9)
    bpt = s["bytes_per_token"]
    lines = [f"precompute worker {result['worker']}/{result['workers']}: {result['examples']} new "
             f"examples ({result['resumed']} already committed), {result['response_tokens']} "
             f"response tokens, {result['tokens']} tokens in {wall:.1f} s = "
             f"{result['tokens'] / wall:.0f} tokens/s",
             f"store {result['store']}: {s['examples']} examples, {s['response_tokens']} "
             f"response tokens, {s['bytes_on_disk']} bytes on disk"
             + (f" = {bpt:.1f} B/response token" if bpt else "")
             + ("" if s["complete"] else " (other workers not finished yet)"),
             format_alpha(s["alpha"]).replace("alpha           ", "alpha (r "
                                               f"{s['r']:g}, {s['tvd_norm']}): ")]
    if result["truncated"]:
        lines.append(f"truncated: {result['truncated']} examples longer than max_seq_len "
                     f"{result['max_seq_len']} were cut in the response (keeping its EOS)")
    if result["skipped_malformed"] or result["skipped_untokenisable"]:
        lines.append(f"skipped rows: {result['skipped_malformed']} malformed, "
                     f"{result['skipped_untokenisable']} untokenisable (first errors: "
                     f"{result['skip_errors']})")
    return "\n".join(lines)


def _json(keys: tuple[str, ...] | None = None) -> Callable[[dict], str]:
    def show(result: dict) -> str:
        return json.dumps({k: result[k] for k in keys if k in result} if keys else result,
                          indent=2)
    return show


def _world_lines(paths: dict) -> str:
    return "\n".join(f"{name}: {path}" for name, path in paths.items())


# ---------------------------------------------------------------------------- where configs go
def _in_folder(folder_field: str, name: str) -> Callable[[Any], Path | None]:
    return lambda config: Path(getattr(config, folder_field)) / name


def _beside_file(config) -> Path | None:
    return Path(config.out).with_name(Path(config.out).name + ".config.yaml") \
        if config.out else None


def _precompute_config_path(config) -> Path | str:
    worker, _ = config.placement(os.environ)
    from storage.store.location import is_object_url
    from teacher_service.config import saved_config_name

    if is_object_url(config.out):  # saved into the store's prefix
        return f"{config.out.rstrip('/')}/{saved_config_name(worker)}"
    return Path(config.out) / saved_config_name(worker)


# ---------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Command:
    name: str
    config: str                                     #: "module:ConfigClass" (a light module)
    run: str                                        #: "module:function(config) -> result"
    help: str
    description: str = ""
    saved_config: Callable[[Any], Path | None] | None = None
    summary: Callable[[Any], str] | None = None
    #: save the config before the run (a folder it owns, so a crashed run can be resumed and
    #: compared) or only after it succeeded (outputs shared with other runs, e.g. a store)
    save_after: bool = False


COMMANDS: tuple[Command, ...] = (
    Command("serve", "teacher_service.config:ServeConfig", "teacher_service.server:run_serve",
            "serve teacher targets over REST (on-policy batches)",
            "Host the dpo and reverse teachers and serve sparse targets on POST /v1/score."),
    Command("precompute", "teacher_service.config:PrecomputeConfig",
            "teacher_service.precompute:run_precompute",
            "precompute sparse teacher targets for a dataset into a store",
            "Score a dataset with the teacher pair and write the targets to a Zarr store. "
            "Rerunning the same command resumes where it stopped.",
            _precompute_config_path, _precompute_lines, save_after=True),
    Command("train", "student_trainer.recipes.configs:TrainConfig",
            "student_trainer.recipes.train:run_train",
            "train the student with AlignDistil (off-policy from a store, or on-policy through "
            "a teacher server)",
            "AlignDistil student training. Off-policy streams sparse teacher targets from a "
            "store; on-policy samples responses from the student and scores them with a running "
            "'aligndistil serve'. Multi-GPU/CPU: launch with torchrun (e.g. torchrun "
            "--nproc-per-node 8 -m aligndistil.cli train ...); each rank reads its own part of "
            "the data and gradients are averaged with DDP.",
            _in_folder("out", SAVED_CONFIG["train"]), _train_line),
    Command("consolidate", "student_trainer.recipes.configs:ConsolidateConfig",
            "student_trainer.recipes.consolidate:run_consolidate",
            "a Hugging Face folder from a sharded checkpoint of 'train --strategy fsdp'",
            "Reads the checkpoint's distributed/ shards in one process (no torchrun) and writes "
            "the full weights (safetensors), config and tokenizer into --out.",
            None, _json(("out", "parameters"))),
    Command("dpo", "student_trainer.recipes.configs:DPOConfig",
            "student_trainer.recipes.dpo:run_dpo",
            "train a teacher with DPO (or the reverse teacher with --reverse)",
            "Sigmoid DPO against the initial model as the reference (its log-probs are computed "
            "once, up front). --reverse swaps chosen and rejected, giving the reverse-DPO "
            "teacher. The trained model is saved into --out as a Hugging Face folder (with "
            "metrics.jsonl, training_curves.png, dpo_summary.json).",
            _in_folder("out", SAVED_CONFIG["dpo"]), _dpo_line),
    Command("sft", "student_trainer.recipes.configs:SFTConfig",
            "student_trainer.recipes.sft:run_sft",
            "supervised fine-tuning on chat demonstrations",
            "Cross-entropy on the assistant's response tokens of {'messages': [...]} (or "
            "prompt/response) rows, tokenised with the model's chat template. Saves a Hugging "
            "Face folder with metrics.jsonl and training_curves.png.",
            _in_folder("out", SAVED_CONFIG["sft"]), _json(("steps", "examples", "last", "final"))),
    Command("eval", "student_trainer.recipes.configs:EvalConfig",
            "student_trainer.recipes.evaluate:run_eval",
            "sample a model on held-out prompts: gold reward, contrastive reward, KL to the dpo "
            "teacher, response length (JSON)",
            "Samples --samples-per-prompt answers per prompt at temperature 1. With --task, the "
            "task's exact gold reward; with --teacher-url (a running 'aligndistil serve'), the "
            "token-averaged contrastive reward beta0*mean_t(log pi_dpo - log pi_reverse) and the "
            "per-token KL(model || dpo) estimated on the samples. Prints the JSON and writes it "
            "to --out.",
            _beside_file, _json(), save_after=True),
    Command("reward-accuracy", "student_trainer.recipes.configs:RewardAccuracyConfig",
            "student_trainer.recipes.reward_accuracy:run_reward_accuracy",
            "how often the DPO reward and the contrastive reward rank chosen above rejected "
            "(the paper's Table 2; JSON)",
            "For preference pairs (the training pairs and/or held-out ones): the DPO reward "
            "beta0*sum_t(log pi_dpo - log pi_ref) and the contrastive reward "
            "beta0*sum_t(log pi_dpo - log pi_rev) of chosen and rejected, and how often each "
            "ranks chosen strictly higher, with counts and ties.",
            _beside_file, _json(), save_after=True),
    Command("toyworld", "aligndistil.worlds.toy.build:WorldConfig",
            "aligndistil.worlds.toy.build:build_world",
            "build the toy world offline: tokenizer, tiny model, demonstrations, prompts",
            "Writes OUT/init (a tiny Llama-architecture model + word-level tokenizer with a chat "
            "template, safetensors), OUT/sft_demos.jsonl (noisy demonstrations of sorting short "
            "lists of numbers), OUT/prompts_train.jsonl and OUT/prompts_eval.jsonl (held-out). "
            "Same files for the same seed.",
            _in_folder("out", TOYWORLD_SAVED_CONFIG), _world_lines),
    Command("pairs", "aligndistil.worlds.pairs:PairsConfig", "aligndistil.worlds.pairs:run_pairs",
            "sample answers from a model and label preference pairs with a gold reward",
            "For every prompt, samples answers at temperature 1; the best and worst by the "
            "task's gold reward become 'chosen' and 'rejected' (UltraFeedback-style JSONL, read "
            "by 'aligndistil dpo').",
            _beside_file, _json(), save_after=True),
    Command("demo", "aligndistil.demo:DemoConfig", "aligndistil.demo:run_demo_command",
            "run the whole pipeline on the embedded toy world (CPU, minutes)",
            "Toy world -> SFT -> preference pairs -> dpo and reverse teachers -> precompute -> "
            "serve -> off-policy and on-policy AlignDistil -> eval of every model; prints each "
            "aligndistil command it runs, a results table, and writes results.json and "
            "results.png (and the demo's own config) into the workdir."),
)


def build_parser() -> argparse.ArgumentParser:
    from aligndistil import worlds  # registers the demo worlds' tasks (light: no torch)
    from storage import cli as storage_cli

    del worlds
    parser = argparse.ArgumentParser(
        prog="aligndistil",
        description="AlignDistil: token-level distillation towards a teacher built from a DPO "
                    "model and a reverse-DPO model.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    storage_cli.register(subparsers)
    for command in COMMANDS:
        p = subparsers.add_parser(command.name, help=command.help,
                                  description=command.description or command.help)
        cfg.add_config_arguments(p, _load(command.config))
        p.set_defaults(command_entry=command)
    return parser


def parse_command(argv: list[str]) -> argparse.Namespace:
    """``argv`` as the command would run it: ``command`` and every resolved option (the
    config's fields, defaults and ``--config`` included). ``inspect`` gives its plain argparse
    namespace."""
    args = build_parser().parse_args(argv)
    entry = getattr(args, "command_entry", None)
    if entry is None:
        return args
    config = cfg.resolve(_load(entry.config), args)
    return argparse.Namespace(command=entry.name, **vars(config))


def run_command(command: Command, args: argparse.Namespace) -> int:
    """Resolve the config, save it, run, and print the one-line (or JSON) summary."""
    config = cfg.resolve(_load(command.config), args)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    _setup_logging(getattr(config, "log_level", "info"))
    path = command.saved_config(config) if command.saved_config else None
    if path is not None and not command.save_after:
        _save_config(path, config, command.name)
    result = _load(command.run)(config)
    if path is not None and command.save_after:
        _save_config(path, config, command.name)
    if command.summary is not None and result is not None:
        print(command.summary(result))
    return result if isinstance(result, int) else 0


def _save_config(path: Path | str, config, command: str) -> None:
    from storage.fsio import atomic_write_text
    from storage.store.location import is_object_url, open_location

    if is_object_url(path):
        root, _, name = str(path).rpartition("/")
        open_location(root).write(name, cfg.dump_config(config, command).encode())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, cfg.dump_config(config, command))


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per HTTP request drowns the training log; retries are logged by our client.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "command_entry", None) is not None:
            return run_command(args.command_entry, args)
        if getattr(args, "func", None) is not None:
            return int(args.func(args) or 0)
        parser.print_help()
        return 2
    except UserError as exc:
        print(f"aligndistil: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
