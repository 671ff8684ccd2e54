"""Demo worlds: small tasks whose quality is known exactly, built offline.

Importing this package registers each world's task with :mod:`student_trainer.tasks`, so
``eval --task`` and ``pairs --task`` find them by name. Light: no torch at import time.
"""

from aligndistil.worlds.toy import task as _toy_task
from student_trainer.tasks import Task, register_task

register_task(Task("sort", _toy_task.gold_reward, "sort a short list of numbers"))
