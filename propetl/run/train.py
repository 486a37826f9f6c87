"""One training run, `train(cfg, output_dir)`, for one task or several (`mode=multitask`): the same recipe, read
top to bottom; a single-task run is a multi-task run with one task. Command line: cli/train.py; setup: lifecycle.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from torch.utils.data import DataLoader

import propetl  # noqa: F401  (registers the config resolvers)
from propetl import methods
from propetl.configs import DataConfig, ModelConfig, ModelSetup
from propetl.data import generation_eval, glue, seq2seq, text_to_text
from propetl.data import metrics as glue_metrics
from propetl.data.batches import PadCollator, token_lengths, tokenise
from propetl.data.multitask import MultiTaskBatches, TaskCollator, freeze_for_new_tasks, task_configs
from propetl.data.tasks import is_generation_task
from propetl.models import backbone
from propetl.models.t5 import TextToTextModel, adds_task_prefix
from propetl.run import log, loop, rundir
from propetl.run.lifecycle import begin_run, end_run, fit_logged, run_facts
from propetl.storage import accounting, checkpoint

logger = logging.getLogger("propetl")


def train(cfg: DictConfig, output_dir: Path, claim=None) -> dict:
    """One run: every task's data -> one model -> fit (best epoch on the selection split; several tasks: the
    mean of their scores) -> each task's test -> save -> report. `claim`: the run folder's (rundir.claim)."""
    output_dir = Path(output_dir)
    finished, ctx, checkpointer, device = begin_run(cfg, output_dir, claim)
    if finished is not None:
        return finished
    multitask = cfg.get("mode") == "multitask"
    base_dir = cfg.multitask.base_checkpoint if multitask else None
    base = checkpoint.read_checkpoint_config(Path(base_dir)) if base_dir else {"tasks": []}
    base_tasks = base["tasks"]
    new_tasks = [t for t in cfg.tasks if t not in base_tasks] if multitask else [cfg.task.name]
    if base_dir and not new_tasks:
        raise checkpoint.CheckpointError(f"tasks={list(cfg.tasks)} are all in {base_dir} already; name a new task")
    if base_dir:  # before any data is read: can the checkpoint take them?
        checkpoint.check_can_add(Path(base_dir), base, new_tasks)
    task_names = [*base_tasks, *new_tasks]
    by_name = dict(zip(task_names, task_configs(task_names) if multitask else [cfg.task]))
    setup, data = ModelSetup.from_config(cfg), DataConfig.from_config(cfg.data)

    # 1. data: every new task's splits (selection / test per data.protocol), tokenised once: GLUE rows for a
    #    classification head, or (model.family=t5) source and target text; training batches of one task each, the
    #    task drawn by temperature (one task: a DataLoader's order; trainer.eval_every_steps: that many draws an epoch)
    data_dir = glue.resolve_data_dir(data.dir)
    tokenizer = backbone.load_tokenizer(setup.model)
    text_to_text = setup.model.text_to_text
    prefix = adds_task_prefix(setup.method)  # text to text: the task name first (full fine-tuning only)
    splits, collators, settings = {}, {}, {}
    for index, name in enumerate(task_names):
        if name not in new_tasks:
            continue
        if text_to_text:  # the reference's format (a task-name prefix only for full fine-tuning), its lengths
            settings[name] = seq2seq.task_settings(by_name[name], tokenizer)
            text = glue.sample_train(
                seq2seq.text_to_text_splits(
                    by_name[name], data_dir, data.protocol, data.split_seed, data.allow_hub, prefix
                ),
                data.max_train_examples,
                data.split_seed,
            )
            splits[name] = seq2seq.tokenise_splits(text, tokenizer, settings[name])
            collators[name] = TaskCollator(seq2seq.Seq2SeqCollator(tokenizer), index)
            continue
        text = glue.sample_train(
            glue.load_glue(by_name[name], data_dir, data.protocol, data.split_seed, data.allow_hub),
            data.max_train_examples,
            data.split_seed,
        )
        splits[name] = {split: tokenise(rows, tokenizer, data.max_length) for split, rows in text.items()}
        collators[name] = TaskCollator(PadCollator(tokenizer, int(by_name[name].num_labels) == 1), index)
    lengths = [token_lengths(splits[n]["train"]) for n in new_tasks] if data.group_by_length else None
    train_batches = MultiTaskBatches(
        [splits[n]["train"] for n in new_tasks],
        [collators[n] for n in new_tasks],
        cfg.trainer.batch_size,
        float(cfg.multitask.temperature),
        cfg.seed,
        lengths,
        cfg.trainer.get("eval_every_steps"),
    )

    def eval_loader(name: str, split: str) -> DataLoader:
        return DataLoader(
            splits[name][split],
            batch_size=loop.eval_batch_size(cfg.trainer.eval_batch_size, device),
            collate_fn=seq2seq.Seq2SeqCollator(tokenizer) if text_to_text else collators[name],
        )

    # 2. model: the pre-trained encoder with the method inside, a head per task (base tasks loaded and frozen)
    if base_dir:
        model, _ = checkpoint.load_multitask(
            Path(base_dir), setup=setup, extra_tasks=[by_name[n] for n in new_tasks], for_training=False, config=base
        )
        freeze_for_new_tasks(model, base_tasks)
        model.train()
    elif text_to_text:  # T5 with the method inside: the text is the output, no heads
        model = TextToTextModel(
            setup,
            task_names,
            task_masks=len(task_names) > 1,
            label_smoothing=float(cfg.trainer.label_smoothing),
            num_labels=[int(by_name[n].get("num_labels", 1)) for n in task_names],
        )
    else:
        model = backbone.MultiTaskModel(
            setup, task_names, [int(by_name[n].num_labels) for n in task_names], task_masks=len(task_names) > 1
        )
    model = model.to(device)
    head_names = model.head_names()
    backbone_params = accounting.backbone_params(model, head_names)
    for name in new_tasks:
        logger.info(
            "%s: %d train / %d selection / %d test examples",
            name,
            len(splits[name]["train"]),
            len(splits[name]["validation"]),
            len(splits[name]["test"]),
        )
    logger.info("%d steps per epoch, device %s", len(train_batches), device)

    def generations(m, name: str, split: str) -> tuple[list[str], list[str]]:
        """(generated, reference) strings of a task's split with its masks: greedy for GLUE, the yaml's beams else."""
        with loop.autocast(device, cfg.trainer.precision):
            return generation_eval.generate_texts(
                m,
                eval_loader(name, split),
                tokenizer,
                settings[name].num_beams,
                settings[name].max_new_tokens,
                device,
                task=task_names.index(name),
            )

    def select(m) -> tuple[dict, float]:
        """Every new task on its selection split; the score to maximise is the mean of their scores (text to text:
        the mean of every metric of every task, the reference's average_metrics)."""
        metrics, scores = {}, []
        if text_to_text:
            per_task = {n: generation_eval.score_generations(n, *generations(m, n, "validation")) for n in new_tasks}
            for name, task_metrics in per_task.items():
                metrics.update({f"{name}/{k}" if multitask else k: v for k, v in task_metrics.items()})
            score = generation_eval.average_metrics(per_task)
            if multitask:
                metrics["mean"] = score
            return metrics, score
        for name in new_tasks:
            task_metrics = loop.evaluate(
                m,
                eval_loader(name, "validation"),
                by_name[name],
                device,
                cfg.trainer.precision,
                f"select {name}",
                cfg.trainer.progress,
            )
            metrics.update({f"{name}/{k}" if multitask else k: v for k, v in task_metrics.items()})
            scores.append(glue_metrics.selection_score(task_metrics, by_name[name].selection_metric))
        if multitask:
            metrics["mean"] = float(np.mean(scores))
        return metrics, float(np.mean(scores))

    # 3. train, choosing the best epoch on the selection split; then every new task on its test split
    eval_rows = (sum(len(splits[n]["validation"]) for n in new_tasks), sum(len(splits[n]["test"]) for n in new_tasks))
    run, result, started = fit_logged(
        cfg, output_dir, model, train_batches, select, head_names, device, checkpointer, ctx, eval_rows
    )
    if base_dir:  # the old tasks' mask rows saw AdamW's decay (no gradient): put them back bit for bit
        checkpoint.load_task_parts(model, Path(base_dir), base_tasks)
    if text_to_text:
        predicted, tests = {}, {}
        for name in new_tasks:
            generated, references = generations(model, name, "test")
            tests[name] = generation_eval.score_generations(name, generated, references)
            if seq2seq.is_glue_task(name):  # the parsed labels (text_to_text.INVALID where a generation names none)
                predicted[name] = (parsed(name, generated), parsed(name, references))
    else:
        predicted = {
            name: loop.predict_task(
                model,
                eval_loader(name, "test"),
                by_name[name],
                device,
                cfg.trainer.precision,
                f"test {name}",
                cfg.trainer.progress,
            )
            for name in new_tasks
        }
        tests = {name: glue_metrics.compute(list(by_name[name].metrics), *predicted[name]) for name in new_tasks}

    # 4. storage (counted from what the checkpoint keeps), the checkpoint and predictions.npz (rank 0),
    #    metrics.json, W&B, summary table
    keep = accounting.kept(model, setup.method)  # counted and written once: its masks coded once per coding
    figures = accounting.account(model, setup, backbone_params, keep)
    if ctx.is_main:  # before metrics.json, which marks the run finished
        log.write_predictions(
            output_dir / rundir.PREDICTIONS_FILE, predicted, {name: int(by_name[name].num_labels) for name in predicted}
        )
    if ctx.is_main and cfg.trainer.save_weights:
        checkpoint.save_checkpoint(model, setup, output_dir / "checkpoint", keep)
        figures.update(checkpoint.file_figures(output_dir / "checkpoint", figures))
    facts = run_facts(cfg, result, started, device, ctx, checkpointer) if ctx.is_main else {}
    if multitask:
        metrics, summary = report_multitask(cfg, output_dir, tests, result, figures, facts, ctx.is_main, base_tasks)
    else:
        metrics, summary = report_single_task(cfg, output_dir, tests, result, figures, facts, ctx.is_main, splits)
    if ctx.is_main:
        checkpointer.discard()  # the run is complete: its training state is no longer needed
        run.summary.update({**summary, **log.best_epoch_summary(result)})
    end_run(ctx)
    return metrics


def parsed(task: str, texts: list[str]) -> np.ndarray:
    """A GLUE task's generated (or reference) strings as the labels its metrics see (predictions.npz)."""
    return np.array([text_to_text.parse_prediction(task, text) for text in texts])


def trivial_baseline(task, splits: dict) -> dict:
    """A classification or regression task's chance figures (glue_metrics.trivial_baseline) from its labels."""
    return glue_metrics.trivial_baseline(
        task.name,
        list(task.metrics),
        splits[task.name]["train"]["label"],
        splits[task.name]["test"]["label"],
        int(task.num_labels) == 1,
    )


def report_single_task(
    cfg, output_dir: Path, tests: dict, result, figures: dict, facts: dict, writes: bool, splits: dict
) -> tuple[dict, dict]:
    """One task's metrics.json (with its trivial baseline) and summary table; returns (metrics, W&B summary)."""
    task = cfg.task
    ((name, test),) = tests.items()
    if not writes:
        return {"glue_score": glue_metrics.task_score(name, test), "test": test}, {}
    metrics = {
        "task": name,
        "model": cfg.model.name,
        "method": cfg.method.name,
        "prototype": cfg.peft.name if cfg.method.name == "peft" else cfg.prototype.name,  # peft: its tuner
        "mask_kind": cfg.mask.kind,
        "mask_sparsity": float(cfg.mask.sparsity),
        "seed": int(cfg.seed),
        "prototype_frozen": methods.prototype_config(cfg.prototype).freeze,
        "protocol": cfg.data.protocol,
        "split_seed": int(cfg.data.split_seed),
        "selection_metric": task.selection_metric,
        "selection": result.best_selection,
        "test": test,
        "glue_score": glue_metrics.task_score(name, test),
        **({} if is_generation_task(task) else {"trivial": trivial_baseline(task, splits)}),  # generation: none
        "storage": figures,
        **facts,
    }
    log.write_metrics(output_dir / "metrics.json", metrics)
    logger.info("results in %s\n%s", output_dir, log.summary_table(metrics))
    return metrics, {
        **{f"test/{k}": v for k, v in test.items()},
        "glue_score": metrics["glue_score"],
        **log.wandb_storage(figures),
    }


def report_multitask(
    cfg, output_dir: Path, tests: dict, result, figures: dict, facts: dict, writes: bool, base_tasks: list[str]
) -> tuple[dict, dict]:
    """Several tasks' metrics.json (each task's numbers, their mean) and summary table; returns (metrics, W&B)."""
    per_task = {}
    for name, test in tests.items():
        selection = {k.split("/", 1)[1]: v for k, v in result.best_selection.items() if k.startswith(f"{name}/")}
        per_task[name] = {"selection": selection, "test": test, "glue_score": glue_metrics.task_score(name, test)}
    if not writes:
        return {"tasks": per_task}, {}
    tests = {n: t["test"] for n, t in per_task.items()}
    metrics = {
        "mode": "multitask",
        "tasks": list(tests),
        "base_tasks": base_tasks,
        "model": cfg.model.name,
        "model_family": ModelConfig.from_config(cfg.model).family,  # t5: text to text (the report's Table 2)
        "method": cfg.method.name,
        "prototype": cfg.prototype.name,
        "mask_kind": cfg.mask.kind,
        "prototype_frozen": methods.prototype_config(cfg.prototype).freeze,
        "mask_sparsity": float(cfg.mask.sparsity),
        "mask_combine": cfg.mask.combine,
        "seed": int(cfg.seed),
        "temperature": float(cfg.multitask.temperature),
        "protocol": cfg.data.protocol,
        "split_seed": int(cfg.data.split_seed),
        "per_task": per_task,
        "mean_test_score": float(np.mean([t["glue_score"] for t in per_task.values()])),
        "glue_average": glue_metrics.glue_average(tests) if glue_metrics.glue_numbers(tests) else None,
        "selection": result.best_selection,
        "storage": figures,
        **facts,
    }
    log.write_metrics(output_dir / "metrics.json", metrics)
    logger.info("results in %s\n%s", output_dir, log.multitask_summary_table(metrics))
    return metrics, {
        **{f"test/{n}/{k}": v for n, t in per_task.items() for k, v in t["test"].items()},
        "mean_test_score": metrics["mean_test_score"],
        **log.wandb_storage(figures),
    }
