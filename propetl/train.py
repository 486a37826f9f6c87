"""One training run, `train(cfg, output_dir)`, which reads top to bottom like a recipe (propetl-train's
command line and Hydra entry: propetl/cli.py; what every run does first and last: propetl/run.py)."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

import propetl  # noqa: F401  (registers the config resolvers)
from propetl import accounting, checkpoint, data, log, loop
from propetl import metrics as glue_metrics
from propetl import model as backbone
from propetl.batches import make_loader
from propetl.multitask import train_multitask
from propetl.run import begin_run, end_run, fit_logged, run_facts

logger = logging.getLogger("propetl")


def train(cfg: DictConfig, output_dir: Path) -> dict:
    """One run: data -> model + method -> fit (best epoch on the selection split) -> test -> save -> report."""
    output_dir = Path(output_dir)
    if cfg.get("mode") == "multitask":
        return train_multitask(cfg, output_dir)
    finished, ctx, checkpointer, device = begin_run(cfg, output_dir)
    if finished is not None:
        return finished
    task = cfg.task

    # 1. data: GLUE splits (selection / test per data.protocol) and dynamically padded batches
    splits = data.load_glue(task, data.resolve_data_dir(cfg.data.dir), cfg.data.protocol, cfg.data.split_seed,
                            cfg.data.allow_hub)
    splits = data.sample_train(splits, cfg.data.max_train_examples, cfg.data.split_seed)
    tokenizer = backbone.load_tokenizer(cfg.model)
    regression = int(task.num_labels) == 1

    def loader(split: str, batch_size: int, shuffle: bool):
        return make_loader(splits[split], tokenizer, cfg.data.max_length, regression, batch_size, shuffle, cfg.seed,
                           group_by_length=bool(cfg.data.group_by_length))

    train_loader = loader("train", cfg.trainer.batch_size, True)
    select_loader = loader("validation", cfg.trainer.eval_batch_size, False)
    test_loader = loader("test", cfg.trainer.eval_batch_size, False)

    # 2. model: the pre-trained backbone, a fresh head, and the method (finetune / petl / propetl)
    model = backbone.build(cfg, int(task.num_labels)).to(device)
    head_names = backbone.head_parameter_names(model)
    backbone_params = accounting.backbone_params(model, head_names)
    logger.info("%s: %d train / %d selection / %d test examples, %d steps per epoch, device %s",
                task.name, len(splits["train"]), len(splits["validation"]), len(splits["test"]), len(train_loader), device)

    # 3. train, choosing the best epoch on the selection split; then score it on the test split
    select = loop.selection_on(select_loader, task, device, cfg.trainer.precision, cfg.trainer.progress)
    run, result, started = fit_logged(cfg, output_dir, model, train_loader, select, head_names, device, checkpointer, ctx)
    test = loop.evaluate(model, test_loader, task, device, cfg.trainer.precision, "test", cfg.trainer.progress)

    # 4. storage: count it, write the checkpoint, and read the real file sizes back (rank 0 writes)
    figures = accounting.account(model, cfg, head_names, backbone_params)
    if not ctx.is_main:                          # rank 0 writes the files
        end_run(ctx)
        return {"glue_score": glue_metrics.task_score(task.name, test), "test": test}
    if cfg.trainer.save_weights:
        checkpoint.save_checkpoint(model, cfg, head_names, output_dir / "checkpoint")
        figures.update(checkpoint.file_figures(output_dir / "checkpoint", figures))

    # 5. report: metrics.json (atomic), W&B summary, summary table
    metrics = {
        "task": task.name, "model": cfg.model.name, "method": cfg.method.name, "prototype": cfg.prototype.name,
        "mask_kind": cfg.mask.kind, "mask_sparsity": float(cfg.mask.sparsity), "seed": int(cfg.seed),
        "protocol": cfg.data.protocol, "split_seed": int(cfg.data.split_seed),
        "selection_metric": task.selection_metric,
        "selection": result.best_selection, "test": test,
        "glue_score": glue_metrics.task_score(task.name, test),
        "trivial": glue_metrics.trivial_baseline(task.name, list(task.metrics), splits["train"]["label"],
                                                 splits["test"]["label"], regression),
        "storage": figures, **run_facts(cfg, result, started, device, ctx),
    }
    log.write_metrics(output_dir / "metrics.json", metrics)
    checkpointer.discard()                     # the run is complete: its training state is no longer needed
    run.summary.update({**{f"test/{k}": v for k, v in test.items()}, "glue_score": metrics["glue_score"],
                        **{f"storage/{k}": v for k, v in figures.items()}})
    logger.info("results in %s\n%s", output_dir, log.summary_table(metrics))
    end_run(ctx)
    return metrics


if __name__ == "__main__":         # python -m propetl.train (torchrun, accelerate launch): the same command as propetl-train
    from propetl.cli import main
    main()
