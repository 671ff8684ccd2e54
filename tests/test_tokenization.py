"""Tokenisation through a real (tiny) Hugging Face tokenizer saved and reloaded from disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import build_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from storage.datasets import Example, parse_row, read_examples
from storage.tokenization import (TokenizationError, tokenize_example, tokenize_prompt,
                                  tokenizer_sha256)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


def ids_of(tok, text: str) -> list[int]:
    """Expected ids, independently of the code under test: word-level, one id per word."""
    return tok.convert_tokens_to_ids(text.split())


def chat(*turns: tuple[str, str], response: str, index: int = 0) -> Example:
    return Example(index=index, source=f"data.jsonl:{index + 1}",
                   prompt_messages=[{"role": r, "content": c} for r, c in turns],
                   response=response)


def test_boundary_is_exact_for_a_single_turn(tok):
    ids, prompt_len = tokenize_example(tok, chat(("user", "sort 3 1 2"), response="1 2 3"))
    assert ids == ids_of(tok, "<|user|> sort 3 1 2 <|assistant|> 1 2 3 <eos>")
    assert prompt_len == len(ids_of(tok, "<|user|> sort 3 1 2 <|assistant|>"))
    assert tok.decode(ids[:prompt_len]) == "<|user|> sort 3 1 2 <|assistant|>"
    assert tok.decode(ids[prompt_len:]) == "1 2 3 <eos>"


def test_boundary_is_exact_for_multi_turn_messages(tok):
    example = chat(("system", "answer"), ("user", "sort 3 1 2"), ("assistant", "3 2 1"),
                   ("user", "no . sort the list"), response="1 2 3")
    ids, prompt_len = tokenize_example(tok, example)
    prompt = ("<|system|> answer <|user|> sort 3 1 2 <|assistant|> 3 2 1 <eos> "
              "<|user|> no . sort the list <|assistant|>")
    assert ids[:prompt_len] == ids_of(tok, prompt)
    assert ids[prompt_len:] == ids_of(tok, "1 2 3 <eos>")
    # the earlier assistant turn's <eos> is prompt, only the last turn's is response
    assert ids[:prompt_len].count(tok.eos_token_id) == 1


def test_plain_prompt_response_row_is_a_one_turn_user_prompt(tok):
    plain = parse_row({"prompt": "copy 4 5", "response": "4 5"}, index=0, source="x")
    as_messages = parse_row({"messages": [{"role": "user", "content": "copy 4 5"},
                                          {"role": "assistant", "content": "4 5"}]},
                            index=0, source="x")
    assert tokenize_example(tok, plain) == tokenize_example(tok, as_messages)
    ids, prompt_len = tokenize_example(tok, plain)
    assert tok.decode(ids[prompt_len:]) == "4 5 <eos>"


def test_ultrafeedback_rows_from_a_file(tok, tmp_path):
    user = {"role": "user", "content": "sort 3 1 2"}
    row = {"prompt": "sort 3 1 2",
           "chosen": [user, {"role": "assistant", "content": "1 2 3"}],
           "rejected": [user, {"role": "assistant", "content": "3 1 2 . done"}]}
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (chosen,) = read_examples(path, response_field="chosen")
    (rejected,) = read_examples(path, response_field="rejected")
    c_ids, c_len = tokenize_example(tok, chosen)
    r_ids, r_len = tokenize_example(tok, rejected)
    assert c_len == r_len and c_ids[:c_len] == r_ids[:r_len]
    assert tok.decode(c_ids[c_len:]) == "1 2 3 <eos>"
    assert tok.decode(r_ids[r_len:]) == "3 1 2 . done <eos>"


def test_pretokenized_passthrough_and_vocab_check(tok):
    example = Example(index=4, source="data.jsonl:5", input_ids=[2, 7, 8, 9, 3], prompt_len=2)
    assert tokenize_example(tok, example) == ([2, 7, 8, 9, 3], 2)
    top = len(tok) - 1
    assert tokenize_example(tok, Example(index=0, source="s", input_ids=[top, 0],
                                         prompt_len=1))[0] == [top, 0]
    oov = Example(index=4, source="data.jsonl:5", input_ids=[2, len(tok), 9], prompt_len=1)
    with pytest.raises(TokenizationError, match=rf"example 4 \(data\.jsonl:5\): input_ids hold "
                                                rf"id\(s\) outside the tokenizer's vocabulary of "
                                                rf"{len(tok)}: \[{len(tok)}\]"):
        tokenize_example(tok, oov)
    bad_len = Example(index=1, source="s", input_ids=[2, 7], prompt_len=2)
    with pytest.raises(TokenizationError, match="prompt_len"):
        tokenize_example(tok, bad_len)


def test_max_seq_len_default_is_an_error_naming_example_and_limit(tok):
    example = chat(("user", "sort 3 1 2"), response="1 2 3", index=6)  # 6 + 4 = 10 tokens
    assert tokenize_example(tok, example, max_seq_len=10)[1] == 6
    with pytest.raises(TokenizationError, match=r"example 6 \(data\.jsonl:7\): 10 tokens exceed "
                                                r"max_seq_len 9"):
        tokenize_example(tok, example, max_seq_len=9)


def test_max_seq_len_truncates_the_response_only_when_asked(tok):
    example = chat(("user", "sort 3 1 2"), response="1 2 3", index=6)
    full, prompt_len = tokenize_example(tok, example)
    ids, cut_len = tokenize_example(tok, example, max_seq_len=7, truncation="response")
    assert (ids, cut_len) == (full[:7], prompt_len) and len(ids) - cut_len == 1
    with pytest.raises(TokenizationError, match="the prompt alone has 6 tokens"):
        tokenize_example(tok, example, max_seq_len=6, truncation="response")
    pretok = Example(index=0, source="s", input_ids=[2, 7, 8, 9, 3], prompt_len=2)
    assert tokenize_example(tok, pretok, max_seq_len=3, truncation="response") == ([2, 7, 8], 2)


def test_template_where_the_prompt_is_not_a_prefix_is_refused(tok):
    # Renders the generation prompt as a different token than a finished assistant turn.
    tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|system|> ' }}{% endif %}")
    with pytest.raises(TokenizationError, match=r"example 3 \(data\.jsonl:4\): the chat "
                                                r"template does not make the prompt a prefix"):
        tokenize_example(tok, chat(("user", "hello"), response="yes", index=3))


def test_template_errors_are_tokenization_errors(tok):
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(TokenizationError, match="roles must alternate"):
        tokenize_example(tok, chat(("user", "hello"), response="yes"))


def test_no_chat_template_is_refused_unless_plain_fallback(tok):
    tok.chat_template = None
    example = chat(("user", "sort 3 1 2"), response="1 2 3", index=2)
    with pytest.raises(TokenizationError, match=r"example 2 .*no chat template"):
        tokenize_example(tok, example)
    ids, prompt_len = tokenize_example(tok, example, plain_fallback=True)
    assert ids[:prompt_len] == ids_of(tok, "sort 3 1 2")
    assert ids[prompt_len:] == ids_of(tok, "1 2 3 <eos>")


def test_tokenizer_sha256_is_stable_across_save_and_reload(tok_dir, tmp_path):
    original = build_tokenizer()
    reloaded = AutoTokenizer.from_pretrained(tok_dir)
    sha = tokenizer_sha256(original)
    assert len(sha) == 64 and int(sha, 16) >= 0
    assert tokenizer_sha256(reloaded) == sha
    reloaded.save_pretrained(tmp_path / "again")
    assert tokenizer_sha256(AutoTokenizer.from_pretrained(tmp_path / "again")) == sha
    reloaded.chat_template = "{{ messages }}"  # documented: the template is not covered
    assert tokenizer_sha256(reloaded) == sha


def test_tokenizer_sha256_changes_with_any_token_or_id(tok_dir):
    base = tokenizer_sha256(AutoTokenizer.from_pretrained(tok_dir))
    added = AutoTokenizer.from_pretrained(tok_dir)
    added.add_tokens(["brandnew"])
    assert tokenizer_sha256(added) != base
    assert tokenizer_sha256(build_tokenizer(extra_words=1)) != base

    # Same token set, two ids swapped: only the mapping differs.
    vocab = build_tokenizer().get_vocab()
    a, b = "sort", "copy"
    swapped = dict(vocab, **{a: vocab[b], b: vocab[a]})
    raw = Tokenizer(models.WordLevel(vocab=swapped, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    assert set(other.get_vocab()) == set(vocab)
    assert tokenizer_sha256(other) != base


def test_tokenize_prompt_is_the_prompt_part_of_an_example(tok):
    example = chat(("user", "sort 3 1 2"), ("assistant", "1 2 3"), ("user", "copy 4"),
                   response="4")
    ids, prompt_len = tokenize_example(tok, example)
    assert tokenize_prompt(tok, list(example.prompt_messages)) == ids[:prompt_len]
    tok.chat_template = None
    with pytest.raises(TokenizationError, match="no chat template"):
        tokenize_prompt(tok, [{"role": "user", "content": "x"}])


def test_response_keep_eos_cuts_the_response_and_keeps_its_ending(tok):
    """The released code's truncation: a cut response still ends with its EOS."""
    ex = parse_row({"prompt": "sort 3 1", "response": " ".join(["1"] * 30)}, index=0,
                   source="t")
    full, p = tokenize_example(tok, ex)
    assert full[-1] == tok.eos_token_id
    seen = []
    ids, p2 = tokenize_example(tok, ex, 12, truncation="response-keep-eos",
                               on_truncate=seen.append)
    assert p2 == p and len(ids) == 12 and seen == [len(full)]
    assert ids[:11] == full[:11] and ids[-1] == tok.eos_token_id
    plain, _ = tokenize_example(tok, ex, 12, truncation="response")
    assert plain == full[:12] and plain[-1] != tok.eos_token_id
    short, _ = tokenize_example(tok, ex, len(full), truncation="response-keep-eos",
                                on_truncate=seen.append)
    assert short == full and len(seen) == 1  # nothing cut, nothing counted
    with pytest.raises(TokenizationError, match="exceed max_seq_len"):
        tokenize_example(tok, ex, p, truncation="response-keep-eos")  # no room for a response
