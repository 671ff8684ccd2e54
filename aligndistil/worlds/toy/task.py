"""The toy task: sort a short list of numbers. The gold reward is exact and token-level.

A prompt is ``"sort 7 2 15"``; the right answer is ``"2 7 15"``. The gold reward of an answer is
the number of positions that hold the right number, divided by ``max(len(answer),
len(target))``: in [0, 1], 1 only for the exact sorted list, and every wrong, missing or extra
token costs the same ``1/len``. So an answer's errors are individual tokens, which is what
token-level rewards (and AlignDistil) are about.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

VERB = "sort"


@dataclass(frozen=True)
class SortTask:
    """Lists of ``min_len..max_len`` distinct numbers from ``0..max_value``."""

    min_len: int = 3
    max_len: int = 5
    max_value: int = 19

    @property
    def words(self) -> list[str]:
        """Every word the task uses (the tokenizer's content vocabulary)."""
        return [VERB] + [str(i) for i in range(self.max_value + 1)]

    def sample_numbers(self, rng: random.Random) -> list[int]:
        n = rng.randint(self.min_len, self.max_len)
        return rng.sample(range(self.max_value + 1), n)

    def random_number(self, rng: random.Random) -> int:
        return rng.randint(0, self.max_value)

    @property
    def prompt_count(self) -> int:
        """Distinct prompts: ordered lists of distinct numbers of every allowed length."""
        return sum(math.perm(self.max_value + 1, n) for n in range(self.min_len, self.max_len + 1))

    # What building a world asks of a task: prompts keyed by a hashable value, demonstrations.
    def sample_key(self, rng: random.Random) -> tuple[int, ...]:
        return tuple(self.sample_numbers(rng))

    def prompt(self, numbers: tuple[int, ...]) -> str:
        return make_prompt(list(numbers))

    def demonstration(self, numbers: tuple[int, ...], noise: float, rng: random.Random) -> str:
        """The sorted list with each number replaced by a random one with probability
        ``noise``."""
        return " ".join(str(self.random_number(rng) if rng.random() < noise else n)
                        for n in sorted(numbers))

    def reference(self, numbers: tuple[int, ...]) -> str:
        return target_answer(list(numbers))


def make_prompt(numbers: list[int]) -> str:
    return " ".join([VERB, *map(str, numbers)])


def parse_prompt(prompt: str) -> list[int]:
    """The numbers of a ``"sort a b c"`` prompt; ValueError for anything else."""
    words = prompt.split()
    if not words or words[0] != VERB or not all(w.isdigit() for w in words[1:]):
        raise ValueError(f"not a sort prompt: {prompt!r}")
    return [int(w) for w in words[1:]]


def target_answer(numbers: list[int]) -> str:
    return " ".join(map(str, sorted(numbers)))


def gold_reward(prompt: str, answer: str) -> float:
    """Per-position correctness against the sorted list over ``max(len(answer), len(target))``."""
    target = sorted(parse_prompt(prompt))
    words = answer.split()
    if not target and not words:
        return 1.0
    hits = sum(1 for w, t in zip(words, target) if w == str(t))
    return hits / max(len(words), len(target))
