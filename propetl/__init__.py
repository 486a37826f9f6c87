"""propetl: a ProPETL experiment runner (one shared PETL prototype, binary masks per layer)."""
from omegaconf import OmegaConf

__version__ = "0.1.0"


def _scaled(value: int, numerator: int, denominator: int) -> int:
    """value * numerator / denominator as an int: sizes that scale with the hidden size."""
    return int(value) * int(numerator) // int(denominator)


def _run_label(method: str, prototype: str) -> str:
    """Folder name of a run: the prototype means nothing for full fine-tuning."""
    return method if method == "finetune" else f"{method}-{prototype}"


OmegaConf.register_new_resolver("propetl.scaled", _scaled, replace=True)
OmegaConf.register_new_resolver("propetl.label", _run_label, replace=True)
