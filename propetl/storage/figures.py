"""The storage figures a run shows, by name: the one schema the run's summary, W&B, runs.csv and table.md read
(accounting.account and checkpoint.file_figures compute them into metrics.json's `storage`). No torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    key: str  # in metrics.json's `storage`
    label: str  # its row in the end-of-run summary table
    with_head: str | None = None  # the key of the same figure counting the head(s)
    column: str = ""  # its column in table.md's storage by mask coding


ONE_TASK = (
    Figure("trainable_params", "trainable parameters", "trainable_params_with_head"),
    Figure("stored_params", "stored fp32 parameters"),
    Figure("mask_entries", "mask entries (1 bit each)"),
    Figure("storage_bytes", "storage, bytes", "storage_bytes_with_head"),
    Figure("file_bytes", "files on disk, bytes", "file_bytes_with_head"),
    Figure("storage_percent_of_backbone", "% of backbone", "storage_percent_of_backbone_with_head"),
    Figure("storage_ratio_to_plain_petl", "ratio to plain PETL", "storage_ratio_to_plain_petl_with_head"),
)
SEVERAL_TASKS = (
    Figure("shared_bytes", "shared part (once)"),
    Figure("task_mask_bytes_per_task", "task mask, per task"),
    Figure("total_bytes", "all tasks", "total_bytes_with_heads"),
    Figure("amortised_bytes_per_task", "amortised per task", "amortised_bytes_per_task_with_head"),
    Figure("separate_single_task_bytes_per_task", "one single-task run"),
    Figure("plain_petl_bytes_per_task", "plain PETL, per task"),
    Figure("file_bytes", "files on disk", "file_bytes_with_head"),
)
WRITTEN_AS = ("dtype", "mask_coding")  # how the checkpoint is written (configs.StorageConfig)
# As written (accounting.coding_figures, checkpoint.file_figures): dense tensors in storage.dtype, masks in each coding.
AS_WRITTEN = (
    Figure("file_mask_bits_per_entry", "mask bits/entry, file", column="bits/entry: file"),
    Figure("mask_bits_per_entry/bits", "mask bits/entry, bits", column="bits"),
    Figure("mask_bits_per_entry/entropy", "mask bits/entry, entropy", column="entropy"),
    Figure("mask_bits_per_entry_bound", "mask bits/entry, log2 C(n,k)", column="log2 C(n,k)"),
    Figure("file_ratio_to_plain_petl", "ratio to PETL, files", column="ratio: files"),
    Figure("storage_ratio_to_plain_petl/bits", "ratio to PETL, bits", column="bits"),
    Figure("storage_ratio_to_plain_petl/entropy", "ratio to PETL, entropy", column="entropy"),
    Figure("storage_ratio_to_plain_petl/bound", "ratio to PETL, log2 C(n,k)", column="log2 C(n,k)"),
)
# Several tasks: the same figures per task, amortised (the shared part counted once over all tasks).
SEVERAL_AS_WRITTEN = tuple(
    Figure(
        f.key.replace("storage_ratio", "amortised_ratio").replace("file_ratio", "file_amortised_ratio"),
        f.label.replace("ratio to PETL", "amortised ratio"),
        column=f.column,
    )
    for f in AS_WRITTEN
)
# runs.csv's storage columns: one task's figures without its head, the backbone, how and what was written.
RUNS_CSV = (*(f.key for f in ONE_TASK), "backbone_params", *WRITTEN_AS, *(f.key for f in AS_WRITTEN))
