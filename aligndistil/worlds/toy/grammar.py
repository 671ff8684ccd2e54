"""The fidelity world's task: continue a word chain in a synthetic grammar of 2,000 words.

The content vocabulary is 40 classes of 50 words, ``w0000`` .. ``w3949`` (class ``cc``, word
``ii``). A prompt gives two words to continue, ``"continue w1507 w0312"``; an answer is 16 words.
Word ``i`` is *good* when its class is the successor class ``7c + 3`` (mod 40) of the previous
word's class ``c`` (the prompt's last word for the first one). So 50 words are right at every
position, and an answer has 50^16 right forms: the teacher's distribution is broad, unlike the
sort task's single right number, and how many of its entries a target store keeps (top-k)
matters.

The gold reward is exact and token-level: the good words among the first 16, divided by
``max(len(answer), 16)``. A wrong word costs ``1/16``; so does a missing or an extra one. A
token that is not a content word is wrong, and so is the word after it.

Demonstrations are noisy in a structured way, as a real model's mistakes are: with probability
``noise`` a word comes from the previous class's *decoy* class ``7c + 23`` (never the
successor), with probability :data:`STRAY` from anywhere in the vocabulary; the chain goes on
from whatever word was written. The decoy rule is what preference pairs can teach: after class
``c``, class ``7c + 23`` is bad.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

VERB = "continue"
CLASSES = 40
WORDS_PER_CLASS = 50
LENGTH = 16
#: Probability that a demonstration word is drawn from the whole vocabulary.
STRAY = 0.02


def word(cls: int, index: int) -> str:
    return f"w{cls:02d}{index:02d}"


def word_class(token: str) -> int | None:
    """The class of a content word; None for anything else."""
    if len(token) == 5 and token[0] == "w" and token[1:].isdigit():
        cls, index = int(token[1:3]), int(token[3:])
        if index < WORDS_PER_CLASS:
            return cls
    return None


def successors(cls: int) -> tuple[int, ...]:
    """The classes a word of class ``cls`` may be followed by."""
    return ((7 * cls + 3) % CLASSES,)


def decoy(cls: int) -> int:
    """The plausible wrong class after ``cls`` (never its successor: they differ by 20)."""
    return (7 * cls + 23) % CLASSES


@dataclass(frozen=True)
class GrammarTask:
    """Word chains of :data:`LENGTH` words; a prompt is keyed by its two words."""

    length: int = LENGTH

    @property
    def words(self) -> list[str]:
        return [VERB] + [word(c, i) for c in range(CLASSES) for i in range(WORDS_PER_CLASS)]

    @property
    def prompt_count(self) -> int:
        """Distinct prompts (two words each)."""
        return (CLASSES * WORDS_PER_CLASS) ** 2

    def sample_key(self, rng: random.Random) -> tuple[str, str]:
        return tuple(word(rng.randrange(CLASSES), rng.randrange(WORDS_PER_CLASS))
                     for _ in range(2))

    def prompt(self, start: tuple[str, str]) -> str:
        return " ".join([VERB, *start])

    def demonstration(self, start: tuple[str, str], noise: float, rng: random.Random) -> str:
        out, cls = [], word_class(start[-1])
        for _ in range(self.length):
            u = rng.random()
            if u < noise:
                cls = decoy(cls)
            elif u < noise + STRAY:
                cls = rng.randrange(CLASSES)
            else:
                cls = rng.choice(successors(cls))
            out.append(word(cls, rng.randrange(WORDS_PER_CLASS)))
        return " ".join(out)

    def reference(self, start: tuple[str, str]) -> str:
        """One right answer (of many): always the first successor, word 0."""
        out, cls = [], word_class(start[-1])
        for _ in range(self.length):
            cls = successors(cls)[0]
            out.append(word(cls, 0))
        return " ".join(out)


def parse_prompt(prompt: str) -> int:
    """The class of the last word of a ``"continue wCCII wCCII"`` prompt; ValueError for
    anything else."""
    words = prompt.split()
    cls = None
    if len(words) == 3 and words[0] == VERB and word_class(words[1]) is not None:
        cls = word_class(words[2])
    if cls is None:
        raise ValueError(f"not a grammar prompt: {prompt!r}")
    return cls


def gold_reward(prompt: str, answer: str) -> float:
    """Good words among the first 16 over ``max(len(answer), 16)``."""
    prev = parse_prompt(prompt)
    words = answer.split()
    hits = 0
    for token in words[:LENGTH]:
        cls = word_class(token)
        if cls is not None and prev is not None and cls in successors(prev):
            hits += 1
        prev = cls
    return hits / max(len(words), LENGTH)
