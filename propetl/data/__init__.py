"""Data: tasks (their yamls; local GLUE files or the hub), their metrics, tokenised batches, multi-task batches."""
