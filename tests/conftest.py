"""Shared fixtures: Hydra compose-API configs, a tiny random BERT for unit tests, the real data folder."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import propetl  # noqa: E402,F401  (config resolvers)
from propetl import configs  # noqa: E402
from propetl.configs import ModelSetup

TINY = {"hidden": 32, "layers": 2, "heads": 4, "vocab": 100}


def compose_cfg(overrides: list[str] = ()):
    """The config a user's command line would give (Hydra compose API)."""
    return configs.compose(overrides)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random BERT saved as a model folder: unit tests only, never a default."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=TINY["vocab"], hidden_size=TINY["hidden"], num_hidden_layers=TINY["layers"],
                        num_attention_heads=TINY["heads"], intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertForSequenceClassification(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_text_model_dir(tmp_path_factory) -> str:
    """A tiny random BERT with the embedded model's tokenizer (vocab 30522): fast real-data runs for tests."""
    from transformers import BertConfig, BertForSequenceClassification

    from propetl.models.backbone import load_tokenizer

    config = BertConfig(vocab_size=30522, hidden_size=TINY["hidden"], num_hidden_layers=TINY["layers"],
                        num_attention_heads=TINY["heads"], intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-text-bert")
    BertForSequenceClassification(config).save_pretrained(folder)
    load_tokenizer(compose_cfg().model).save_pretrained(folder)
    return str(folder)


def tiny_text_overrides(folder: str, glue_dir) -> list[str]:
    """Command-line overrides for a fast real-data run with the tiny text model."""
    return [f"model.name_or_path={folder}", "model.name=tiny", f"model.hidden_size={TINY['hidden']}",
            f"model.num_layers={TINY['layers']}", f"data.dir={glue_dir}", "logger.mode=disabled",
            "trainer.progress=false", "trainer.batch_size=8", "trainer.eval_batch_size=128"]


@pytest.fixture
def tiny_cfg(tiny_model_dir):
    """compose_cfg with the tiny model swapped in."""
    def make(*overrides: str):
        return compose_cfg([f"model.name_or_path={tiny_model_dir}", "model.name=tiny",
                            f"model.hidden_size={TINY['hidden']}", f"model.num_layers={TINY['layers']}",
                            "data.max_length=64", "logger.mode=disabled", *overrides])     # its 64 positions
    return make


def tiny_batch(batch: int = 3, length: int = 7, seed: int = 0, with_padding: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, TINY["vocab"], (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    if with_padding:
        attention_mask[0, length - 2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor([0, 1, 1][:batch])}


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The real GLUE folder (RTE, MRPC, CoLA, STS-B, SST-2). Skips without it, unless PROPETL_REQUIRE_DATA=1."""
    from propetl.data.glue import resolve_data_dir

    found = resolve_data_dir(None)
    if found is None or not (found / "RTE" / "train.tsv").exists():
        if os.environ.get("PROPETL_REQUIRE_DATA") == "1":
            pytest.fail("no local GLUE data: run `make link-data` or set PROPETL_DATA_DIR")
        pytest.skip("no local GLUE data (make link-data, or PROPETL_DATA_DIR)")
    return found


def format1_packed_masks(masks) -> torch.Tensor:
    """A mask tensor as format 1 wrote it (still read): 8 entries a byte, big-endian bit order, zero-padded."""
    return torch.from_numpy(np.packbits(np.asarray(masks).reshape(-1).astype(bool)))


def tiny_fit_inputs(cfg, batch_size: int):
    """(model, batches) for calling propetl.run.loop.fit directly: the config's model (seed 0) and 16 short two-text
    rows, alternating labels 0 and 1, in batches of `batch_size`."""
    import datasets

    from propetl.data.batches import PadCollator, tokenise
    from propetl.data.multitask import MultiTaskBatches
    from propetl.models import backbone
    torch.manual_seed(0)
    model = backbone.build(ModelSetup.from_config(cfg), 2)
    rows = datasets.Dataset.from_dict({"text_a": ["a cat sat", "the dog ran far"] * 8, "text_b": ["yes", "no"] * 8,
                                       "label": [0, 1] * 8})
    tokenizer = backbone.load_tokenizer(cfg.model)
    return model, MultiTaskBatches([tokenise(rows, tokenizer, 32)], [PadCollator(tokenizer, False)], batch_size, 10.0, 0)


TINY_T5 = {"d_model": 32, "layers": 2}
T5_CORPUS = [  # what the tiny T5 tokenizer learns pieces from: every printable ASCII character, GLUE's field words
    "".join(chr(c) for c in range(33, 127)),
    "sentence1: sentence2: sentence: question: the a cat sat on mat 0 1 2 3 4 5 6 7 8 9 0.0 1.5 2.4 3.1 4.8 5.0",
    "summarize: Translate Romanian to English: The house is big. summary document",
] * 5


def tiny_t5_tokenizer():
    """A T5-like tokenizer built offline (no SentencePiece file exists offline): Unigram pieces over Metaspace,
    </s> after every text, <pad> 0, </s> 1, <unk> 2 (as tests/test_seq2seq_data.py's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    specials = ["<pad>", "</s>", "<unk>"]
    tok.train_from_iterator(T5_CORPUS, trainers.UnigramTrainer(vocab_size=200, special_tokens=specials,
                                                               unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> str:
    """A tiny random T5 (2 encoder + 2 decoder blocks, d_model 32) saved as a model folder with its tokenizer
    (config.json, model.safetensors, tokenizer files): what model=t5-small model.name_or_path=<folder> loads."""
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = tiny_t5_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=TINY_T5["d_model"], d_kv=8, d_ff=64,
                      num_layers=TINY_T5["layers"], num_decoder_layers=TINY_T5["layers"], num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-t5")
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_t5_overrides(folder: str, glue_dir) -> list[str]:
    """Command-line overrides for a fast real-data T5 run: model=t5-small's settings, the tiny T5's folder and sizes."""
    return ["model=t5-small", f"model.name_or_path={folder}", "model.name=tiny-t5",
            f"model.hidden_size={TINY_T5['d_model']}", f"model.num_layers={TINY_T5['layers']}", f"data.dir={glue_dir}",
            "logger.mode=disabled", "trainer.progress=false", "trainer.batch_size=8", "trainer.eval_batch_size=64"]


MNLI_LABELS = ("entailment", "neutral", "contradiction")


def write_mnli(folder: Path, rows: dict[str, int]) -> Path:
    """GLUE's MNLI files under folder/MNLI (sentence1, sentence2, gold_label), `rows` data rows a file (file name ->
    rows): texts name the file and row, labels cycle over the three classes. Returns `folder` (a data.dir)."""
    (folder / "MNLI").mkdir(parents=True, exist_ok=True)
    for name, count in rows.items():
        lines = ["index\tsentence1\tsentence2\tgold_label"]
        lines += [f"{i}\t{name} p{i}\t{name} h{i}\t{MNLI_LABELS[i % 3]}" for i in range(count)]
        (folder / "MNLI" / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
