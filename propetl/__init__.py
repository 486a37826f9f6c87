"""propetl: a ProPETL experiment runner (one shared PETL prototype, binary masks per layer)."""
from omegaconf import OmegaConf

__version__ = "0.1.0"


def _scaled(value: int, numerator: int, denominator: int) -> int:
    """value * numerator / denominator as an int: sizes that scale with the hidden size."""
    return int(value) * int(numerator) // int(denominator)


def _run_label(method: str, prototype: str) -> str:
    """Folder name of a run: the prototype means nothing for full fine-tuning."""
    return method if method == "finetune" else f"{method}-{prototype}"


def _task_folder(mode: str, task: str, tasks) -> str:
    """Folder of a run's task: the task, or multitask-<t1>-<t2>-... for mode=multitask."""
    return f"multitask-{'-'.join(tasks or [])}" if mode == "multitask" else task


OmegaConf.register_new_resolver("propetl.scaled", _scaled, replace=True)
OmegaConf.register_new_resolver("propetl.task_folder", _task_folder, replace=True)
OmegaConf.register_new_resolver("propetl.label", _run_label, replace=True)
