"""Tasks whose quality is known exactly: a name -> gold reward registry.

``eval --task NAME`` and ``pairs --task NAME`` look a task up here. The trainer knows no task
itself: a world registers its own when it is imported (``aligndistil.worlds`` does this for the
demo worlds), so nothing in ``student_trainer`` imports a world.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from storage.errors import ConfigError, UserError


@dataclass(frozen=True)
class Task:
    name: str
    #: ``gold_reward(prompt text, answer text) -> float`` in [0, 1]; raises ``ValueError`` for a
    #: prompt that does not belong to the task
    gold_reward: Callable[[str, str], float]
    description: str = ""

    def score(self, prompt: str, answer: str, where: str = "") -> float:
        """The gold reward, with a prompt of another task reported as a user error."""
        try:
            return float(self.gold_reward(prompt, answer))
        except ValueError as exc:
            raise UserError(f"{where + ': ' if where else ''}--task {self.name}: {exc}") from None


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except KeyError:
        raise ConfigError(f"--task {name!r}: known tasks are {sorted(_TASKS)}") from None


def task_names() -> list[str]:
    return sorted(_TASKS)
