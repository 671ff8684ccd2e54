"""The errors a user can cause (bad flags, files, a mismatched store or server): the CLI prints
their one-line message instead of a traceback. Anything else is a bug and keeps its traceback."""

from __future__ import annotations

from storage.datasets import DataError
from storage.record import RecordError
from storage.tokenization import TokenizationError
from student_trainer.checkpoint import CheckpointError
from student_trainer.client import TeacherError
from student_trainer.modeling import ModelLoadError
from student_trainer.prompts import PromptError


class ConfigError(ValueError):
    """Flags that do not make a valid run; the message names the flag."""


class TokenizerMismatch(ValueError):
    """The store or server was made with another tokenizer than the student's."""


def _store_errors() -> tuple[type[BaseException], ...]:
    try:
        from storage.store.errors import StoreError
    except ImportError:  # pragma: no cover - the store package is part of the project
        return ()
    return (StoreError,)


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, TokenizerMismatch, ModelLoadError, PromptError, DataError, RecordError,
    TokenizationError, CheckpointError, TeacherError, *_store_errors())
