"""The model: backbones (a transformers encoder with its heads) and the one multi-task-capable model class."""
