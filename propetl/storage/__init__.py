"""Storage: what a task costs (accounting), mask coding, the checkpoint format and its reader, sealed folders."""
