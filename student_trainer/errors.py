"""The trainer's user errors beyond the shared root (:class:`storage.errors.UserError`), and the
one tokenizer check every target source (a store, a teacher server) must pass."""

from __future__ import annotations

from storage.errors import ConfigError, UserError

__all__ = ["ConfigError", "TokenizerMismatch", "check_same_tokenizer"]


class TokenizerMismatch(UserError, ValueError):
    """The store or server was made with another tokenizer than the student's."""


def check_same_tokenizer(source: str, *, theirs_sha256: str | None, theirs_vocab: int | None,
                         student_sha256: str, student_vocab: int, student: str,
                         error: type[Exception] = TokenizerMismatch) -> None:
    """Refuse targets whose token ids would mean other tokens to the student.

    ``source`` names where the targets come from ("store PATH", "the teacher server at URL").
    """
    if theirs_sha256 == student_sha256 and theirs_vocab == student_vocab:
        return
    raise error(
        f"{source} uses a different tokenizer than the student {student}: vocab_size="
        f"{theirs_vocab}, tokenizer_sha256={str(theirs_sha256)[:16]}... against the student's "
        f"vocab_size={student_vocab}, tokenizer_sha256={student_sha256[:16]}... Its token ids "
        f"would mean other tokens; train a student that shares the teachers' tokenizer")
