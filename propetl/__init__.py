"""propetl: a ProPETL experiment runner (one shared PETL prototype, binary masks per layer).

The Python API (propetl/api.py) is imported on first use of its names, so `import propetl` stays light:
    from propetl import LoRAConfig, ProPETLTrainer, embedded_model_path, get_propetl_model, load_propetl
(LoRAConfig, AdapterConfig, PrefixConfig: each prototype's dataclass, from its module; ProPETLConfig: flat names.)
"""

from omegaconf import OmegaConf

__version__ = "0.1.0"
API_NAMES = (
    "LoRAConfig",
    "AdapterConfig",
    "PrefixConfig",
    "ProPETLConfig",
    "ProPETLModel",
    "ProPETLTrainer",
    "get_propetl_model",
    "load_propetl",
    "embedded_model_path",
)
MODULE_OF = {
    "LoRAConfig": "propetl.methods.lora",
    "AdapterConfig": "propetl.methods.adapter",
    "PrefixConfig": "propetl.methods.prefix",
    "ProPETLTrainer": "propetl.hf_trainer",
    "embedded_model_path": "propetl.models.backbone",
}  # the rest: propetl.api


def __getattr__(name: str):
    if name in API_NAMES:
        import importlib

        return getattr(importlib.import_module(MODULE_OF.get(name, "propetl.api")), name)
    raise AttributeError(f"module 'propetl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API_NAMES])


def _scaled(value: int, numerator: int, denominator: int) -> int:
    """value * numerator / denominator as an int: sizes that scale with the hidden size."""
    return int(value) * int(numerator) // int(denominator)


def _run_label(method: str, prototype: str) -> str:
    """Folder name of a run: the prototype means nothing for full fine-tuning."""
    return method if method == "finetune" else f"{method}-{prototype}"


def _task_folder(mode: str, task: str, tasks) -> str:
    """Folder of a run's task: the task, or multitask-<t1>-<t2>-... for mode=multitask."""
    return f"multitask-{'-'.join(tasks or [])}" if mode == "multitask" else task


def _job_folder(override_dirname: str, job_number) -> str:
    """A sweep job's folder: its overrides (task=rte,seed=1), or its number when it has none; one folder level (a path
    value's / as %2F), and a name past 200 characters cut, with a hash of the whole kept."""
    name = override_dirname.replace("%", "%25").replace("/", "%2F") or str(job_number)
    if len(name) > 200:
        import hashlib

        name = f"{name[:180]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name


OmegaConf.register_new_resolver("propetl.scaled", _scaled, replace=True)
OmegaConf.register_new_resolver("propetl.task_folder", _task_folder, replace=True)
OmegaConf.register_new_resolver("propetl.label", _run_label, replace=True)
OmegaConf.register_new_resolver("propetl.job_folder", _job_folder, replace=True)
