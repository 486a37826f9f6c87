"""Data: tasks (local GLUE files or the hub), their metrics, tokenised batches, multi-task batches."""
