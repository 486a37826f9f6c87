"""Data: tasks (their yamls; local GLUE files or the hub), their metrics, tokenised batches, multi-task batches; text to
text for T5 (text_to_text, seq2seq, generation_tasks, generation_eval, generation_metrics)."""
