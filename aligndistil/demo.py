"""``aligndistil demo``: the whole AlignDistil pipeline on the toy world, as a user would type it.

Every stage is a real ``aligndistil`` subcommand run as a subprocess (printed before it runs, so
the demo doubles as the tutorial); the teacher server is a real ``aligndistil serve`` process on
loopback. Stages:

    toyworld -> sft -> pairs -> dpo, dpo --reverse -> precompute -> serve
    -> train off-policy (from the store) -> train on-policy (through the server)
    -> eval of every model -> results table, results.json, results.png

Each stage writes into ``--workdir``; a stage whose output is complete is skipped on a rerun
(``--fresh`` starts over), and ``precompute`` resumes by itself, so an interrupted demo picks up
where it stopped. Child output goes to ``WORKDIR/logs/<stage>.log``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

from storage.errors import UserError
from storage.fsio import atomic_write_text


@dataclass(frozen=True)
class DemoSize:
    """Everything that sets how big (and how long) the demo is. Plain data."""

    demos: int = 4000             #: noisy SFT demonstrations
    train_prompts: int = 1024     #: prompts for preference pairs and on-policy training
    eval_prompts: int = 128       #: held-out prompts
    sft_epochs: int = 5
    sft_lr: float = 3e-3
    samples_per_prompt: int = 4   #: samples per prompt when labelling pairs
    dpo_lr: float = 5e-5          #: teachers stay close to SFT, as in the paper (small TVD)
    dpo_epochs: int = 2
    top_k: int = 8                #: of a 28-token vocabulary: the sparse tail is exercised
    student_lr: float = 1e-4
    off_policy_epochs: int = 8
    on_policy_epochs: int = 2
    global_batch_size: int = 32
    eval_samples: int = 4         #: samples per held-out prompt
    max_new_tokens: int = 16


SIZES = {
    "default": DemoSize(),
    # The CI test's size: the same pipeline on less data (about a third of the time).
    "small": DemoSize(demos=2000, train_prompts=512, eval_prompts=64, sft_epochs=6,
                      off_policy_epochs=6, on_policy_epochs=4, eval_samples=8),
}

#: The fidelity world (``--world grammar``): 16-word answers over a 2,008-token vocabulary,
#: 50 right words per position; k = 64 as for a real model.
GRAMMAR_SIZES = {
    "default": DemoSize(demos=8000, sft_epochs=6, top_k=64, max_new_tokens=20),
    # Fewer held-out samples only: with half the preference pairs the teachers' extrapolation
    # is noisy enough to make the students worse than SFT (measured; benchmarks/results).
    "small": DemoSize(demos=8000, sft_epochs=6, eval_prompts=64, eval_samples=8, top_k=64,
                      max_new_tokens=20),
}

#: World name -> (its task, its sizes).
WORLD_SIZES = {"sort": SIZES, "grammar": GRAMMAR_SIZES}

#: Model name in the results -> its folder under the workdir.
MODELS = {"sft": "sft", "dpo": "dpo", "reverse": "reverse",
          "aligndistil-off-policy": "off_policy/final",
          "aligndistil-on-policy": "on_policy/final"}


class DemoError(UserError, RuntimeError):
    """A stage of the demo failed; the message names it and shows its log's last lines."""


@dataclass(kw_only=True)
class DemoConfig:
    """``aligndistil demo``: where and how big."""
    workdir: Annotated[str, "where every stage writes (a rerun skips finished stages)"] = \
        "aligndistil-demo"
    world: Annotated[Literal["sort", "grammar"], "sort: short number lists, vocabulary 28; "
                     "grammar: the fidelity world, 16-word chains over 2,000 words"] = "sort"
    size: Annotated[Literal["default", "small"], "how much data (small: the CI test's size)"] = \
        "default"
    seed: Annotated[int, "seed of the whole pipeline"] = 0
    fresh: Annotated[bool, "delete the workdir first"] = False
    port: Annotated[int, "teacher server port (0: a free one)", "[0,65535]"] = 0
    device: Annotated[Literal["auto", "cpu", "cuda"], "where every stage runs"] = "cpu"


def run_demo_command(config: DemoConfig) -> int:
    """``aligndistil demo``: the pipeline, with the demo's own resolved config saved in the
    workdir (``demo_config.yaml``; ``aligndistil demo --config`` of it replays the run)."""
    from aligndistil.config import dump_config
    from storage.fsio import atomic_write_text

    workdir = Path(config.workdir)
    if config.fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(workdir / "demo_config.yaml", dump_config(config, "demo"))
    run_demo(workdir, WORLD_SIZES[config.world][config.size], seed=config.seed, port=config.port,
             device=config.device, world=config.world)
    return 0


# ------------------------------------------------------------------------------ the pipeline
def build_teachers(runner: "Runner", w: Path, size: DemoSize, *, seed: int, world: str,
                   device: str) -> Path:
    """The stages up to the two teachers: ``world -> sft -> pairs -> dpo, dpo --reverse``
    (each skipped when its output is complete). Returns the world's folder."""
    dev = ["--device", device]
    world_dir = w / "world"
    runner.step("toyworld", ["toyworld", "--world", world, "--out", world_dir, "--seed", seed,
                             "--demos", size.demos, "--train-prompts", size.train_prompts,
                             "--eval-prompts", size.eval_prompts, "--overwrite"],
                done=world_dir / "prompts_eval.jsonl")
    runner.step("sft", ["sft", "--model", world_dir / "init", "--data",
                        world_dir / "sft_demos.jsonl", "--out", w / "sft", "--lr", size.sft_lr,
                        "--epochs", size.sft_epochs, "--seed", seed, "--no-progress",
                        "--overwrite", *dev],
                done=w / "sft" / "sft_summary.json")
    runner.step("pairs", ["pairs", "--model", w / "sft", "--prompts",
                          world_dir / "prompts_train.jsonl", "--out", w / "pairs.jsonl",
                          "--task", world, "--samples-per-prompt", size.samples_per_prompt,
                          "--max-new-tokens", size.max_new_tokens, "--seed", seed, *dev],
                done=w / "pairs.jsonl")
    for name, extra in (("dpo", []), ("reverse", ["--reverse"])):
        runner.step(name, ["dpo", *extra, "--model", w / "sft", "--data", w / "pairs.jsonl",
                           "--out", w / name, "--lr", size.dpo_lr, "--epochs", size.dpo_epochs,
                           "--batch-size", 32, "--min-lr-ratio", 0, "--seed", seed,
                           "--no-progress", "--overwrite", *dev],
                    done=w / name / "dpo_summary.json")
    return world_dir


def student_flags(w: Path, size: DemoSize, *, seed: int, device: str,
                  save_every: int = 1000) -> list:
    """The ``train`` flags every AlignDistil student of the demo (and the benchmarks built on
    it) shares: the SFT model as the start, the size's learning rate and batch, quiet output."""
    return ["--model", w / "sft", "--lr", size.student_lr, "--global-batch-size",
            size.global_batch_size, "--min-lr-ratio", 0, "--seed", seed, "--save-every",
            save_every, "--no-progress", "--report-to", "none", "--overwrite", "--device", device]


def run_demo(workdir: Path, size: DemoSize, *, seed: int = 0, fresh: bool = False,
             port: int = 0, device: str = "cpu", world: str = "sort") -> dict:
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runner = Runner(workdir)
    w = workdir
    dev = ["--device", device]
    started = time.perf_counter()
    task = world  # each world's task is registered under the world's name
    world_dir = build_teachers(runner, w, size, seed=seed, world=world, device=device)
    runner.step("precompute", ["precompute", "--dpo-model", w / "dpo", "--reverse-model",
                               w / "reverse", "--data", w / "pairs.jsonl", "--response-field",
                               "chosen", "--out", w / "store", "--top-k", size.top_k, *dev])
    runner.step("inspect", ["inspect", w / "store", "--verify"])
    train = student_flags(w, size, seed=seed, device=device)
    runner.step("train-off-policy", ["train", "--mode", "off-policy", "--store", w / "store",
                                     "--out", w / "off_policy", "--epochs",
                                     size.off_policy_epochs, *train],
                done=w / "off_policy" / "final" / "model.safetensors")
    with runner.server(["serve", "--dpo-model", w / "dpo", "--reverse-model", w / "reverse",
                        "--top-k", size.top_k, *dev], port=port) as url:
        runner.step("train-on-policy", ["train", "--mode", "on-policy", "--teacher-url", url,
                                        "--prompts", world_dir / "prompts_train.jsonl",
                                        "--out", w / "on_policy", "--epochs",
                                        size.on_policy_epochs, "--max-new-tokens",
                                        size.max_new_tokens, "--rollout-batch-size",
                                        size.global_batch_size, *train],
                    done=w / "on_policy" / "final" / "model.safetensors")
        evals = {}
        for name, folder in MODELS.items():
            out = w / "eval" / f"{name}.json"
            runner.step(f"eval-{name}", ["eval", "--model", w / folder, "--prompts",
                                         world_dir / "prompts_eval.jsonl", "--task", task,
                                         "--teacher-url", url, "--samples-per-prompt",
                                         size.eval_samples, "--max-new-tokens",
                                         size.max_new_tokens, "--seed", seed + 1234,
                                         "--out", out, *dev])
            evals[name] = json.loads(out.read_text(encoding="utf-8"))
    results = {"world": world, "size": asdict(size), "seed": seed, "workdir": str(w),
               "seconds": round(time.perf_counter() - started, 1),
               "stage_seconds": runner.seconds, "commands": runner.commands,
               "models": {name: _summary(e) for name, e in evals.items()}}
    results["comparison"] = _comparison(results["models"])
    (w / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print()
    print(format_table(results["models"]))
    print()
    for line in results["comparison"]["lines"]:
        print(line)
    png = plot_results(w, results["models"])
    print(f"\nresults: {w / 'results.json'}; plot: {png}; total {results['seconds']} s")
    return results


def _summary(evaluation: dict) -> dict:
    keys = ("gold_reward", "exact_match", "contrastive_reward", "kl_to_dpo",
            "mean_response_length", "samples")
    return {k: evaluation.get(k) for k in keys}


def _comparison(models: dict) -> dict:
    gold = {name: m["gold_reward"] for name, m in models.items()}
    lines, beats = [], {}
    for student in ("aligndistil-off-policy", "aligndistil-on-policy"):
        for base in ("sft", "dpo"):
            diff = gold[student] - gold[base]
            beats[f"{student} > {base}"] = diff > 0
            verdict = "beats" if diff > 0 else "does NOT beat"
            lines.append(f"{student} {verdict} {base} on gold reward: {gold[student]:.3f} vs "
                         f"{gold[base]:.3f} ({diff:+.3f})")
    return {"beats": beats, "lines": lines}


def format_table(models: dict) -> str:
    cols = [("model", None), ("gold reward", "gold_reward"), ("exact match", "exact_match"),
            ("contrastive reward", "contrastive_reward"), ("KL to dpo", "kl_to_dpo"),
            ("length", "mean_response_length")]
    rows = [[name] + [f"{m[k]:.4f}" if isinstance(m.get(k), float) else str(m.get(k))
                      for _, k in cols[1:]] for name, m in models.items()]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, (h, _) in enumerate(cols)]
    fmt = lambda cells: "  ".join(c.ljust(wd) if i == 0 else c.rjust(wd)  # noqa: E731
                                  for i, (c, wd) in enumerate(zip(cells, widths)))
    return "\n".join([fmt([h for h, _ in cols]), fmt(["-" * wd for wd in widths])]
                     + [fmt(r) for r in rows])


def plot_results(workdir: Path, models: dict) -> Path:
    """Training curves of every stage and the gold reward per model, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from student_trainer.metrics import read_jsonl

    curves = [("SFT: cross-entropy", [("sft", "sft", "loss")]),
              ("teachers: DPO loss", [("dpo", "dpo", "loss"), ("reverse", "reverse", "loss")]),
              ("AlignDistil: loss", [("off-policy", "off_policy", "loss"),
                                     ("on-policy", "on_policy", "loss")]),
              ("AlignDistil: KL(student || teacher)", [("off-policy", "off_policy", "kl"),
                                                       ("on-policy", "on_policy", "kl")])]
    fig, axes = plt.subplots(1, 5, figsize=(22, 3.8))
    for ax, (title, series) in zip(axes, curves):
        for label, folder, key in series:
            path = workdir / folder / "metrics.jsonl"
            rows = read_jsonl(path) if path.exists() else []
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    ax = axes[-1]
    names = list(models)
    values = [models[n]["gold_reward"] for n in names]
    ax.bar(range(len(names)), values, color=["#999", "#4a7", "#c66", "#37c", "#73c"][:len(names)])
    ax.set_xticks(range(len(names)), [n.replace("aligndistil-", "AD ") for n in names],
                  rotation=30, fontsize=8)
    ax.set_ylim(min(values) - 0.1 if values else 0, 1.0)
    ax.set_title("gold reward (held-out prompts)", fontsize=10)
    for i, v in enumerate(values):
        ax.text(i, v + 0.005, f"{v:.3f}", ha="center", fontsize=8)
    fig.tight_layout()
    png = workdir / "results.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


# ------------------------------------------------------------------------------ processes
class Runner:
    """Runs ``aligndistil`` subcommands as child processes, logging each to its own file."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.commands: list[str] = []
        # Each finished stage's seconds, kept in logs/ so a rerun that skips it still has them.
        self._seconds_file = self.logs / "stage_seconds.json"
        self.seconds: dict[str, float] = {}
        if self._seconds_file.is_file():
            self.seconds = json.loads(self._seconds_file.read_text(encoding="utf-8"))
        # Progress bars belong on a terminal, not in the children's log files.
        self.env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}

    def _argv(self, args: list) -> tuple[list[str], str]:
        args = [str(a) for a in args]
        return [sys.executable, "-m", "aligndistil.cli", *args], shlex.join(["aligndistil", *args])

    def step(self, name: str, args: list, *, done: Path | None = None) -> None:
        argv, shown = self._argv(args)
        self.commands.append(shown)
        if done is not None and done.exists():
            print(f"[{name}] done already ({done} exists), skipped:\n  $ {shown}", flush=True)
            return
        print(f"[{name}]\n  $ {shown}", flush=True)
        log = self.logs / f"{name.replace('/', '_')}.log"
        started = time.perf_counter()
        with open(log, "w", encoding="utf-8") as fh:
            rc = subprocess.call(argv, stdout=fh, stderr=subprocess.STDOUT, env=self.env)
        seconds = time.perf_counter() - started
        self.seconds[name] = round(seconds, 1)
        atomic_write_text(self._seconds_file, json.dumps(self.seconds, indent=1) + "\n")
        if rc != 0:
            tail = "".join(log.read_text(encoding="utf-8", errors="replace")
                           .splitlines(keepends=True)[-25:])
            raise DemoError(f"stage {name!r} failed (exit {rc}); last lines of {log}:\n{tail}")
        last = _last_line(log)
        print(f"  ok in {seconds:.1f} s" + (f": {last}" if last else ""), flush=True)

    def server(self, args: list, *, port: int = 0, name: str = "serve") -> "Server":
        """A server for a ``with`` block, logging to ``logs/NAME.log`` (one name per server
        that runs at the same time)."""
        return Server(self, args, port, name)


class Server:
    """``aligndistil serve`` as a child process for the duration of a ``with`` block."""

    def __init__(self, runner: Runner, args: list, port: int, name: str = "serve"):
        self.runner, self.args, self.port = runner, args, port or _free_port()
        self.name = name
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        import httpx

        argv, shown = self.runner._argv([*self.args, "--host", "127.0.0.1", "--port", self.port])
        self.runner.commands.append(shown + " &")
        print(f"[{self.name}]\n  $ {shown} &", flush=True)
        self.log = open(self.runner.logs / f"{self.name}.log", "w", encoding="utf-8")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=self.runner.env)
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                raise DemoError(f"the teacher server exited with {self.proc.returncode}; see "
                                f"{self.runner.logs / (self.name + '.log')}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    print(f"  ready at {url}", flush=True)
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.__exit__(None, None, None)
        raise DemoError(f"the teacher server was not ready within 180 s; see {self.log.name}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # graceful: finishes in-flight requests
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            print(f"[{self.name}] stopped (exit {self.proc.returncode})", flush=True)
        self.log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines()
             if ln.strip() and not ln.startswith((" ", "\t", "{", "}"))]
    return lines[-1][:200] if lines else ""


__all__ = ["DemoConfig", "DemoSize", "Runner", "SIZES", "WORLD_SIZES", "build_teachers",
           "student_flags", "run_demo", "run_demo_command"]
