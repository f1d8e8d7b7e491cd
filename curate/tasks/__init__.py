"""Task files (DESIGN §2): the builtin YAML tasks beside this file, and the loader."""

from curate.tasks.task import (
    ClassSpec,
    Task,
    builtin_task,
    builtin_task_file,
    builtin_task_names,
    load_task,
    name_key,
)

__all__ = ["ClassSpec", "Task", "builtin_task", "builtin_task_file", "builtin_task_names", "load_task", "name_key"]
