"""Demo worlds: small tasks whose quality is known exactly, built offline.

Importing this package registers each world's task with :mod:`student_trainer.tasks`, so
``eval --task`` and ``pairs --task`` find them by name. Light: no torch at import time.
"""

from aligndistil.worlds.toy import grammar as _grammar_task
from aligndistil.worlds.toy import task as _toy_task
from student_trainer.tasks import Task, register_task

register_task(Task("sort", _toy_task.gold_reward, "sort a short list of numbers"))
register_task(Task("grammar", _grammar_task.gold_reward,
                   "continue a 16-word chain in a synthetic grammar of 2,000 words"))
