"""Packing under every attention implementation we let pack, FlashAttention-2's rules included.

transformers' flash-attention path reads ``position_ids`` as sequence boundaries only when the
batch has ONE row (``_is_packed_sequence`` in ``modeling_flash_attention_utils``); with several
rows it runs plain causal attention over each row, across the packed sequences. flash-attn
cannot run on this CPU, so :func:`emulated_flash_attention` follows the same rules through
transformers' attention interface, with exact attention per segment (its mask function is
transformers' own ``flash_attention_mask``). With it:

- the packing probe must pack several rows, and fail when the layout mixes sequences;
- the engine's records and the trainer's loss and gradients from packed batches must equal the
  padded layout's, as they do under sdpa and eager;
- ``--attn-implementation`` reaches every model a command loads.

The real kernel's packed-vs-padded equality is a section of benchmarks/gpu/run.sh.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from causal_lm.packed import pack_rows, packed_hidden, packing_check
from student_trainer.collate import micro_batches
from student_trainer.modeling import StudentForward, load_student
from teacher_service.engine import ScoreRequest, TeacherEngine
from teacher_service.models import load_teacher_pair
from teacher_service.targets import TargetConfig
from test_engine import _requests
from test_trainer_components import _step_loss_and_grads
from tiny_models import build_tokenizer
from trainer_support import dense_records, random_sequences

FLASH = "emulated_fa2"  # (a name with "flash" in it is taken for a kernels-hub id)


def _segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Sequence number of each place of a row: a new sequence wherever positions do not step
    by one (what transformers' packed-sequence detection reads)."""
    step = torch.diff(position_ids, prepend=position_ids[:1] - 1)
    return (step != 1).cumsum(-1)


def emulated_flash_attention(module, query, key, value, attention_mask, dropout=0.0,
                             scaling=None, is_causal=None, **kwargs):
    """FlashAttention-2's batch rules (transformers' ``_flash_attention_forward``), computed
    exactly: a 2-D padding mask -> per row, causal over the unpadded places; no mask and one
    row whose positions restart -> variable-length (block-diagonal causal); otherwise plain
    causal over each whole row. Returns ``[B, T, H, D]`` like the real one."""
    batch, heads, length, _ = query.shape
    groups = heads // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    allowed = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    allowed = allowed.expand(batch, length, length).clone()
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None:
        allowed &= attention_mask[:, None, -length:].bool()
    elif batch == 1 and position_ids is not None:
        seg = _segments(position_ids[0])
        allowed &= seg[:, None] == seg[None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None],
                                         scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(FLASH, emulated_flash_attention)
AttentionMaskInterface.register(FLASH, flash_attention_mask)


@pytest.fixture(scope="module")
def pairs(teacher_pair):
    """The same teachers under sdpa and under the emulated FlashAttention-2."""
    return {name: load_teacher_pair(*teacher_pair, device="cpu", attn_implementation=name)
            for name in ("sdpa", FLASH)}


def test_the_emulation_follows_flash_attentions_batch_rules(pairs):
    """Padded batches: the same as sdpa. Packed: one row keeps its sequences apart, several rows
    do not (the rule that made multi-row packing wrong)."""
    model, ref = pairs[FLASH].dpo, pairs["sdpa"].dpo
    assert model.config._attn_implementation == FLASH
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = ref(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1, :6], b[1, :6])
    seqs = [torch.randint(5, 100, (n,), generator=g).tolist() for n in (5, 4, 6, 3)]
    packed = pack_rows(seqs, [[0, 1], [2, 3]], pad_id=0)
    decoder = model.get_decoder()
    with torch.no_grad():
        alone = decoder(input_ids=torch.tensor([seqs[1]])).last_hidden_state[0]
        rows = decoder(input_ids=packed.input_ids,
                       position_ids=packed.position_ids).last_hidden_state
        one_row = decoder(input_ids=packed.input_ids[:1],
                          position_ids=packed.position_ids[:1]).last_hidden_state
    assert not torch.allclose(rows[0, 5:9], alone, atol=1e-3)  # several rows: mixed
    torch.testing.assert_close(one_row[0, 5:9], alone, rtol=1e-4, atol=1e-5)  # one row: apart


def test_the_probe_packs_several_rows_and_the_packed_layout_keeps_them_apart(pairs,
                                                                           monkeypatch):
    model = pairs[FLASH].dpo
    ok, why = packing_check(model)
    assert ok, why
    assert FLASH in why
    # the probe itself must catch a layout that mixes rows: give flash its rows as they are
    monkeypatch.setattr("causal_lm.packed.ROW_AWARE", frozenset({"sdpa", "eager", FLASH}))
    ok, why = packing_check(model)
    assert not ok and "do not match separate forwards" in why


@pytest.mark.parametrize("attention", ["eager", FLASH])
def test_engine_packed_records_equal_padded_ones(pairs, teacher_pair, attention):
    pair = pairs.get(attention) or load_teacher_pair(*teacher_pair, device="cpu",
                                                     attn_implementation=attention)
    reqs = _requests(pair.tokenizer, n=15, seed=3)
    config = TargetConfig(top_k=8, chunk_size=16)
    padded = TeacherEngine(pair, config, max_batch_tokens=80).score(reqs)
    packed = TeacherEngine(pair, config, max_batch_tokens=80, packing=True).score(reqs)
    for a, b in zip(padded, packed):
        np.testing.assert_allclose(a.alpha, b.alpha, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.dpo_logprobs, b.dpo_logprobs, atol=1e-4)
        np.testing.assert_allclose(a.tail_logmass, b.tail_logmass, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", FLASH])
def test_trainer_packed_loss_and_gradients_equal_padded_ones(teacher_pair, attention):
    tok = build_tokenizer()
    records, _ = dense_records(*teacher_pair, random_sequences(len(tok), 12, seed=7, min_len=4,
                                                               max_len=24))
    model, _ = load_student(teacher_pair[0], device=torch.device("cpu"))
    model.set_attn_implementation(attention)
    forward = StudentForward(model, len(tok))
    results = []
    for packing in (False, True):
        batches = micro_batches(records, max_tokens=72, pad_id=0, packing=packing)
        if packing:
            assert any(b.input_ids.shape[0] > 1 for b in batches)  # several rows in a batch
        results.append(_step_loss_and_grads(model, forward, batches, len(records)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for name in grads_a:  # float32 rounding: within 1e-4 of each tensor's largest entry
        scale = float(grads_a[name].abs().max())
        worst = float((grads_b[name] - grads_a[name]).abs().max())
        assert worst <= 1e-4 * scale, (name, worst, scale)


def test_packed_hidden_gives_flash_one_row_and_sdpa_its_rows(pairs):
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(5, 100, (n,), generator=g).tolist() for n in (6, 3, 5, 4)]
    packed = pack_rows(seqs, [[0, 1], [2, 3]], pad_id=0)
    with torch.no_grad():
        flash = packed_hidden(pairs[FLASH].dpo, packed.input_ids, packed.position_ids)
        sdpa = packed_hidden(pairs["sdpa"].dpo, packed.input_ids, packed.position_ids)
    assert flash.shape == sdpa.shape == (2, 9, pairs[FLASH].dpo.config.hidden_size)
    torch.testing.assert_close(flash, sdpa, rtol=1e-4, atol=1e-5)


def test_an_unknown_attention_implementation_is_one_clear_error(teacher_pair, tmp_path,
                                                                capsys):
    from aligndistil.cli import main

    rc = main(["serve", "--dpo-model", str(teacher_pair[0]), "--reverse-model",
               str(teacher_pair[1]), "--device", "cpu", "--attn-implementation", "no_such_kernel",
               "--port", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--attn-implementation no_such_kernel" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["serve", "precompute", "train", "dpo", "sft", "eval",
                                     "reward-accuracy"])
def test_every_command_that_loads_models_takes_attn_implementation(command, capsys):
    from aligndistil.cli import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert "--attn-implementation" in capsys.readouterr().out


def test_precompute_with_eager_attention_writes_the_default_records(teacher_pair, tmp_path):
    from aligndistil.cli import main
    from storage.store import TargetStore
    from test_precompute import _write_data

    data = _write_data(tmp_path / "data.jsonl", 6, seed=1)
    common = ["precompute", "--dpo-model", str(teacher_pair[0]), "--reverse-model",
              str(teacher_pair[1]), "--data", str(data), "--top-k", "4", "--device", "cpu",
              "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "default")]) == 0
    assert main([*common, "--out", str(tmp_path / "eager"), "--attn-implementation",
                 "eager"]) == 0
    a, b = TargetStore.open(tmp_path / "default"), TargetStore.open(tmp_path / "eager")
    assert len(a) == len(b) == 6
    for i in range(6):
        np.testing.assert_allclose(a[i].dpo_logprobs, b[i].dpo_logprobs, atol=1e-4)
    saved = (tmp_path / "eager" / "precompute-w0000.config.yaml").read_text()
    assert "attn_implementation: eager" in saved


def test_on_the_cpu_a_flash_models_probe_runs_sdpa_in_the_one_row_layout(pairs, monkeypatch):
    """Rank 0 of an FSDP run holds the whole model on the CPU, where FlashAttention cannot run:
    the probe stands in sdpa, in the layout the kernel would get, and puts the model back."""
    import causal_lm.packed as packed

    model = pairs[FLASH].dpo
    monkeypatch.setattr(packed, "is_flash", lambda m: packed.attention_of(m) == FLASH)
    seen = []
    real = packed.packed_hidden
    monkeypatch.setattr(packed, "packed_hidden", lambda m, i, p, one_row=None: (
        seen.append((packed.attention_of(m), one_row)), real(m, i, p, one_row=one_row))[1])
    ok, why = packed.packing_check(model)
    assert ok and "probed with sdpa on the cpu" in why, why
    assert seen == [("sdpa", True)]
    assert packed.attention_of(model) == FLASH


def test_flash_attention_with_bf16_off_is_refused_before_any_work(tmp_path, capsys):
    from aligndistil.cli import main

    rc = main(["train", "--mode", "off-policy", "--store", str(tmp_path), "--model",
               str(tmp_path), "--out", str(tmp_path / "out"), "--attn-implementation",
               "flash_attention_2", "--bf16", "off"])
    err = capsys.readouterr().err
    assert rc == 2 and "runs in half precision only; keep --bf16 auto or on" in err, err
