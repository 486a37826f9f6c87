"""Text-to-text data and generation-based evaluation (propetl.data.seq2seq, generation_tasks, generation_eval).

No T5 weights or SentencePiece files exist offline: a tiny Unigram tokenizer with T5's conventions (Metaspace, <pad> 0,
</s> 1 appended, <unk> 2) is trained here on a few lines, and models are a tiny random T5ForConditionalGeneration or a
fake whose generate returns fixed token ids (metric values checked by hand)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest
import torch
from conftest import compose_cfg, write_mnli
from omegaconf import OmegaConf
from scipy.stats import pearsonr

from propetl.configs import ConfigError
from propetl.data import generation_eval, generation_tasks, glue, seq2seq, text_to_text
from propetl.data.glue import DataError
from propetl.data.multitask import MultiTaskBatches, TaskCollator

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
SHARED_GLUE = Path("/work/shared/data/glue")
GLUE_TASKS = ("rte", "mrpc", "cola", "stsb", "sst2")
CORPUS = [  # what the tiny tokenizer learns pieces from: every printable ASCII character, some words
    "".join(chr(c) for c in range(33, 127)),
    "sentence1: sentence2: sentence: the a cat sat on mat 0 1 2 3 4 5 6 7 8 9 0.0 1.5 2.4 3.1 4.8 5.0",
    "Translate Romanian to English: The house is big. summary document",
] * 5


@pytest.fixture(scope="module", autouse=True)
def _private_datasets_cache(tmp_path_factory):
    """The Arrow cache goes to a tmp folder, never to ~/.cache or the repo."""
    cache = str(tmp_path_factory.mktemp("hf_datasets_cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_CACHE", cache)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        yield


@pytest.fixture(scope="module")
def tokenizer():
    """A T5-like tokenizer built offline: Unigram pieces over Metaspace, </s> after every text, pad id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    specials = ["<pad>", "</s>", "<unk>"]
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=200, special_tokens=specials, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def glue_dir() -> Path:
    candidates = [glue.resolve_data_dir(None), os.environ.get("PROPETL_DATA_DIR"), SHARED_GLUE]
    for candidate in candidates:
        if candidate and (Path(candidate) / "RTE" / "train.tsv").is_file():
            return Path(candidate)
    if os.environ.get("PROPETL_REQUIRE_DATA") == "1":
        pytest.fail("no GLUE data folder found and PROPETL_REQUIRE_DATA=1")
    pytest.skip(f"no GLUE data folder found (tried data/glue, $PROPETL_DATA_DIR, {SHARED_GLUE})")


def task_cfg(name: str):
    return OmegaConf.load(REPO_ROOT / "conf" / "task" / f"{name}.yaml")


def text_split(sources, targets) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"source": list(sources), "target": list(targets)})


# --- tokenising and batches ---------------------------------------------------------------------------------------


def test_tokenise_truncates_sources_and_targets_and_ends_them_with_eos(tokenizer):
    split = text_split(["sentence: " + "the cat sat on the mat " * 20, "sentence: a"], ["3.1 " * 30, "0"])
    out = seq2seq.tokenise(split, tokenizer, max_source_length=16, max_target_length=5)
    assert out.column_names == ["target", "input_ids", "labels"]
    assert [len(ids) for ids in out["input_ids"]] == [16, len(tokenizer("sentence: a")["input_ids"])]
    assert [len(ids) for ids in out["labels"]] == [5, 2]
    assert all(ids[-1] == tokenizer.eos_token_id for ids in [*out["input_ids"], *out["labels"]])  # truncation keeps </s>
    assert out["target"][1] == "0"  # the text stays for scoring


def test_each_split_truncates_its_labels_to_its_own_length(tokenizer):
    long = text_split(["summarize: the cat sat"], ["the cat sat on the mat " * 10])
    settings = seq2seq.TextToTextSettings(8, {"train": 4, "validation": 6, "test": 12}, 5, 1)
    out = seq2seq.tokenise_splits({"train": long, "validation": long, "test": long}, tokenizer, settings)
    assert {name: len(split["labels"][0]) for name, split in out.items()} == {"train": 4, "validation": 6, "test": 12}
    assert all(len(split["input_ids"][0]) == 8 for split in out.values())


def test_a_pad_id_in_the_labels_becomes_minus_100(tokenizer):
    out = seq2seq.tokenise(text_split(["a"], ["1 <pad> 0"]), tokenizer, 8, 8)
    ids = tokenizer(text_target="1 <pad> 0")["input_ids"]
    assert tokenizer.pad_token_id in ids
    assert out["labels"][0] == [seq2seq.LABEL_PAD if t == tokenizer.pad_token_id else t for t in ids]


def test_collate_pads_inputs_with_pad_and_labels_with_minus_100(tokenizer):
    rows = [
        {"input_ids": [5, 6, 7, 1], "labels": [9, 1], "target": "x"},
        {"input_ids": [5, 1], "labels": [9, 8, 7, 1], "target": "y"},
    ]
    batch = seq2seq.Seq2SeqCollator(tokenizer, with_targets=True)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1], [5, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[9, 1, -100, -100], [9, 8, 7, 1]]
    assert batch["targets"] == ["x", "y"] and batch["input_ids"].dtype == torch.long
    assert "targets" not in seq2seq.Seq2SeqCollator(tokenizer)(rows)  # training batches: tensors only
    tokenizer.padding_side = "left"
    try:
        left = seq2seq.Seq2SeqCollator(tokenizer)(rows)
    finally:
        tokenizer.padding_side = "right"
    assert left["input_ids"].tolist()[1] == [0, 0, 5, 1] and left["attention_mask"].tolist()[1] == [0, 0, 1, 1]
    assert left["labels"].tolist()[0] == [9, 1, -100, -100]  # labels always on the right


def test_a_tokenizer_without_pad_is_refused(tokenizer):
    class NoPad:
        pad_token_id, padding_side = None, "right"

    with pytest.raises(ValueError, match="has no pad token"):
        seq2seq.Seq2SeqCollator(NoPad())


def test_multitask_batches_take_the_seq2seq_collator(tokenizer):
    splits = [
        seq2seq.tokenise(text_split([f"sentence: {i}" for i in range(n)], ["1"] * n), tokenizer, 16, 4) for n in (6, 3)
    ]
    collators = [TaskCollator(seq2seq.Seq2SeqCollator(tokenizer), i) for i in range(2)]
    batches = list(MultiTaskBatches(splits, collators, batch_size=2, temperature=10, seed=0))
    assert len(batches) == 5
    for batch in batches:
        assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["labels"].shape[0] == len(batch["task"])


# --- GLUE as text to text -----------------------------------------------------------------------------------------


def test_glue_uses_the_encoder_paths_split(glue_dir):
    text = seq2seq.glue_text_to_text(task_cfg("rte"), glue_dir)
    encoder = glue.load_glue(task_cfg("rte"), glue_dir)
    for split in ("train", "validation", "test"):
        assert len(text[split]) == len(encoder[split])
        assert text[split]["label"] == encoder[split]["label"]
    assert (len(text["validation"]), len(text["test"])) == (138, 139)  # paper.md §5.3
    first = encoder["validation"][0]
    assert text["validation"][0]["source"] == f"sentence1: {first['text_a']} sentence2: {first['text_b']}"
    assert text["validation"][0]["target"] == str(first["label"])
    prefixed = seq2seq.glue_text_to_text(task_cfg("rte"), glue_dir, add_prefix=True)
    assert prefixed["validation"][0]["source"] == "rte " + text["validation"][0]["source"]


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_decoded_labels_parse_back_to_the_label(task, glue_dir, tokenizer):
    """Every validation example: decode(label ids) -> parse_prediction -> the original label (STS-B: rounded)."""
    split = seq2seq.text_to_text_splits(task_cfg(task), glue_dir)["validation"]
    tokenised = seq2seq.tokenise(split, tokenizer, *seq2seq.GLUE_LENGTHS)
    decoded = tokenizer.batch_decode(list(tokenised["labels"]), skip_special_tokens=True)
    parsed = [text_to_text.parse_prediction(task, text) for text in decoded]
    assert len(parsed) == len(split) > 0 and text_to_text.INVALID not in parsed
    if task == "stsb":
        assert all(abs(p - label) <= 0.05 + 1e-6 for p, label in zip(parsed, split["label"]))
    else:
        assert parsed == list(split["label"])
    assert decoded == list(split["target"])


# --- QQP, MNLI, QNLI as text to text: a fake hub (no local data here) --------------------------------------------

HUB_GLUE = {"qnli": ("question", "sentence", 2), "qqp": ("question1", "question2", 2), "mnli": ("premise", "hypothesis", 3)}


def fake_hub(monkeypatch, task: str, sizes: dict[str, int]) -> list[tuple]:
    """datasets.load_dataset answers nyu-mll/glue/<task> with `sizes` rows a split (texts naming split and row, labels
    cycling over the task's classes); returns the calls it answered."""
    first, second, classes = HUB_GLUE[task]

    def split(name: str, rows: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict({first: [f"{name} a{i}" for i in range(rows)],
                                           second: [f"{name} b{i}" for i in range(rows)],
                                           "label": [i % classes for i in range(rows)], "idx": list(range(rows))})

    calls: list[tuple] = []
    hub = datasets.DatasetDict({name: split(name, rows) for name, rows in sizes.items()})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append(args) or hub)
    return calls


MNLI_HUB = {"train": 12, "validation_matched": 5, "validation_mismatched": 4, "test_matched": 3}


def test_t5_mnli_selects_on_mismatched_and_reports_matched(monkeypatch):
    """paper.md §5.3: T5 differs for MNLI only: train = full train, validation = mismatched, test = matched."""
    calls = fake_hub(monkeypatch, "mnli", MNLI_HUB)
    text = seq2seq.text_to_text_splits(task_cfg("mnli"), None)
    assert calls == [("nyu-mll/glue", "mnli")]
    assert {name: len(split) for name, split in text.items()} == {"train": 12, "validation": 4, "test": 5}
    assert text["validation"][0] == {"source": "premise: validation_mismatched a0 hypothesis validation_mismatched b0",
                                     "target": "0", "label": 0}
    assert text["test"]["source"][4] == "premise: validation_matched a4 hypothesis validation_matched b4"
    assert text["train"]["target"][:4] == ["0", "1", "2", "0"]
    encoder = glue.load_glue(task_cfg("mnli"), None, protocol="full_dev")  # the encoder path: matched only
    assert encoder["validation"]["text_a"][0] == "validation_matched a0"
    full_dev = seq2seq.text_to_text_splits(task_cfg("mnli"), None, protocol="full_dev")  # matched for both
    assert full_dev["validation"]["source"] == full_dev["test"]["source"] == text["test"]["source"]


def test_t5_mnli_names_a_hub_without_the_mismatched_split(monkeypatch):
    fake_hub(monkeypatch, "mnli", {"train": 12, "validation_matched": 5})
    with pytest.raises(DataError, match="has no split 'validation_mismatched' .*fix text_to_text.validation.hub in "
                                        "conf/task/mnli.yaml"):
        seq2seq.text_to_text_splits(task_cfg("mnli"), None)
    assert len(glue.load_glue(task_cfg("mnli"), None, protocol="full_dev")["test"]) == 5  # the encoder path needs none


@pytest.mark.parametrize("task, source", [("qnli", "question: {} sentence: {}"), ("qqp", "question1: {} question2: {}")])
def test_t5_qnli_and_qqp_split_as_the_encoder_paths_large_tasks(monkeypatch, task, source, tokenizer):
    fake_hub(monkeypatch, task, {"train": 1010, "validation": 4})
    text = seq2seq.text_to_text_splits(task_cfg(task), None)
    encoder = glue.load_glue(task_cfg(task), None)
    assert {name: len(split) for name, split in text.items()} == {"train": 10, "validation": 1000, "test": 4}
    for name in text:
        assert text[name]["label"] == encoder[name]["label"]
        assert text[name]["source"] == [source.format(a, b) for a, b in zip(encoder[name]["text_a"], encoder[name]["text_b"])]
    tokenised = seq2seq.tokenise(text["test"], tokenizer, *seq2seq.GLUE_LENGTHS)  # labels decode and parse back
    decoded = tokenizer.batch_decode(list(tokenised["labels"]), skip_special_tokens=True)
    assert [text_to_text.parse_prediction(task, t) for t in decoded] == text["test"]["label"] == [0, 1, 0, 1]


MNLI_FILES = {"train.tsv": 9, "dev_matched.tsv": 4, "dev_mismatched.tsv": 3}


def test_t5_mnli_from_local_files_reads_dev_mismatched(tmp_path):
    folder = write_mnli(tmp_path, MNLI_FILES)
    text = seq2seq.text_to_text_splits(task_cfg("mnli"), folder, allow_hub=False)
    assert {name: len(split) for name, split in text.items()} == {"train": 9, "validation": 3, "test": 4}
    assert text["validation"][2] == {"source": "premise: dev_mismatched.tsv p2 hypothesis dev_mismatched.tsv h2",
                                     "target": "2", "label": 2}
    names = lambda files: [path.name for path in files]  # what a run's fingerprint hashes
    assert names(glue.local_files(task_cfg("mnli"), folder)) == ["train.tsv", "dev_matched.tsv"]
    t5_files = glue.local_files(task_cfg("mnli"), folder, text_to_text=True)
    assert names(t5_files) == ["train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"]
    assert names(glue.local_files(task_cfg("mnli"), folder, "full_dev", text_to_text=True)) == names(t5_files)[:2]


def test_t5_mnli_without_dev_mismatched_names_the_file(tmp_path):
    folder = write_mnli(tmp_path, {name: rows for name, rows in MNLI_FILES.items() if "mismatched" not in name})
    with pytest.raises(DataError, match=f"expected {folder / 'MNLI' / 'dev_mismatched.tsv'} \\(not found\\) and the hub "
                                        "is disabled"):
        seq2seq.text_to_text_splits(task_cfg("mnli"), folder, allow_hub=False)
    assert glue.local_files(task_cfg("mnli"), folder, text_to_text=True) is None  # a run would take the hub


# --- generation tasks (XSum, WMT16) -------------------------------------------------------------------------------


def local_folder(tmp_path: Path, task: str, fixture: str) -> Path:
    """A data.dir holding <task>/{train,validation,test}.jsonl made of a fixture's lines."""
    lines = (FIXTURES / fixture).read_text(encoding="utf-8").splitlines()
    (tmp_path / task).mkdir()
    for split, part in (("train", lines[:3]), ("validation", lines[3:]), ("test", lines)):
        (tmp_path / task / f"{split}.jsonl").write_text("\n".join(part) + "\n", encoding="utf-8")
    return tmp_path


def test_xsum_from_a_local_folder(tmp_path):
    splits = generation_tasks.load_generation_task(task_cfg("xsum"), local_folder(tmp_path, "xsum", "xsum_tiny.jsonl"))
    rows = [json.loads(line) for line in (FIXTURES / "xsum_tiny.jsonl").read_text().splitlines()]
    assert {k: len(v) for k, v in splits.items()} == {"train": 3, "validation": 2, "test": 5}
    assert splits["test"]["source"] == [f"summarize: {r['document']}" for r in rows]  # the reference's source
    assert splits["test"]["target"] == [r["summary"] for r in rows]


def test_wmt16_sources_carry_the_reference_prefix(tmp_path):
    folder = local_folder(tmp_path, "wmt16_ro_en", "wmt16_ro_en_tiny.jsonl")
    splits = seq2seq.text_to_text_splits(task_cfg("wmt16_ro_en"), folder)
    assert splits["train"][0] == {"source": "Translate Romanian to English: Casa este mare.", "target": "The house is big."}
    prefixed = generation_tasks.load_generation_task(task_cfg("wmt16_ro_en"), folder, add_prefix=True)
    assert prefixed["train"][0]["source"] == "wmt16-ro-en Translate Romanian to English: Casa este mare."  # its name


def test_validation_size_draws_rows_as_the_reference_draws_n_val(tmp_path):
    cfg, folder = task_cfg("xsum"), local_folder(tmp_path, "xsum", "xsum_tiny.jsonl")
    full = generation_tasks.load_generation_task(cfg, folder)["validation"]
    cfg.validation_size = 1
    for seed in (42, 7):
        splits = generation_tasks.load_generation_task(cfg, folder, split_seed=seed)
        first = torch.randperm(2, generator=torch.Generator().manual_seed(seed))[0].item()
        assert splits["validation"]["target"] == [full[first]["target"]] and len(splits["test"]) == 5


def test_task_settings(tokenizer):
    xsum = seq2seq.task_settings(task_cfg("xsum"), tokenizer)
    assert xsum == seq2seq.TextToTextSettings(512, {"train": 64, "validation": 64, "test": 128}, 63, 6)
    wmt = seq2seq.task_settings(task_cfg("wmt16_ro_en"), tokenizer)
    assert wmt == seq2seq.TextToTextSettings(64, {"train": 32, "validation": 64, "test": 64}, 299, 4)
    rte = seq2seq.task_settings(task_cfg("rte"), tokenizer)
    assert (rte.max_source_length, rte.max_target_length["test"], rte.num_beams) == (128, 128, 1)
    assert rte.max_new_tokens == len(tokenizer("0")["input_ids"]) - 1  # the label's tokens, no room for </s>
    labels = seq2seq.label_strings("stsb", 1)
    assert (len(labels), labels[0], labels[17], labels[-1]) == (26, "0.0", "3.4", "5.0")
    longest = max(len(tokenizer(label)["input_ids"]) for label in labels)
    assert seq2seq.task_settings(task_cfg("stsb"), tokenizer).max_new_tokens == longest - 1


def test_hub_columns_inside_a_field(monkeypatch):
    """wmt16 on the hub: translation = {"ro": ..., "en": ...}."""
    pairs = [{"ro": "Casa este mare.", "en": "The house is big."}]
    hub = datasets.DatasetDict({s: datasets.Dataset.from_dict({"translation": pairs}) for s in generation_tasks.SPLITS})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args: calls.append(args) or hub)
    splits = generation_tasks.load_generation_task(task_cfg("wmt16_ro_en"), None)
    assert calls == [("wmt16", "ro-en")]
    assert splits["test"][0]["target"] == "The house is big." and splits["test"][0]["source"].endswith("Casa este mare.")


@pytest.mark.skipif(not datasets.config.HF_HUB_OFFLINE, reason="needs offline mode: the hub must fail fast")
@pytest.mark.parametrize("task, hub", [("xsum", "EdinburghNLP/xsum"), ("wmt16_ro_en", "wmt16/ro-en")])
def test_offline_hub_is_one_line_naming_the_task_and_the_local_folder(task, hub, tmp_path):
    with pytest.raises(DataError) as caught:
        generation_tasks.load_generation_task(task_cfg(task), tmp_path)
    message = str(caught.value)
    assert "\n" not in message and f"task '{task}'" in message and f"hub ({hub}) is unreachable" in message
    assert f"set data.dir=PATH to a folder holding {task}/ with train.jsonl" in message
    with pytest.raises(DataError, match="data.allow_hub=false"):
        generation_tasks.load_generation_task(task_cfg(task), None, allow_hub=False)


def test_a_task_yaml_without_its_fields_is_one_line():
    cfg = task_cfg("xsum")
    del cfg.local["target"]
    with pytest.raises(DataError, match="task config 'xsum' lacks the key local.target"):
        generation_tasks.load_generation_task(cfg, None)


def test_a_bad_jsonl_line_names_file_and_line(tmp_path):
    folder = local_folder(tmp_path, "xsum", "xsum_tiny.jsonl")
    (folder / "xsum" / "validation.jsonl").write_text('{"document": "a", "summary": "b"}\n{"document": "a"}\n')
    with pytest.raises(DataError, match=r"validation.jsonl line 2 has no text field 'summary'"):
        generation_tasks.load_generation_task(task_cfg("xsum"), folder)


@pytest.mark.parametrize("task", ["xsum", "wmt16_ro_en"])
def test_the_encoder_runner_refuses_generation_tasks_in_one_line(task):
    from propetl.validate import validate

    with pytest.raises(ConfigError, match=rf"^task={task} needs a text-to-text model \(model=t5-…\)") as caught:
        validate(compose_cfg([f"task={task}"]))
    assert "\n" not in str(caught.value) and "xsum" not in str(caught.value).split("runner: ")[1]


# --- generation-based evaluation ----------------------------------------------------------------------------------


class FakeGenerator:
    """generate returns the token ids of fixed strings, in order, as T5 would: the decoder start (pad) in front, </s>
    after, pad to the batch's longest."""

    def __init__(self, tokenizer, outputs):
        self.tokenizer, self.outputs, self.calls = tokenizer, list(outputs), []
        self.training = True

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def generate(self, input_ids, attention_mask, num_beams, max_new_tokens):
        self.calls.append((input_ids.shape[0], num_beams, max_new_tokens))
        texts = [self.outputs.pop(0) for _ in range(input_ids.shape[0])]
        ids = [[self.tokenizer.pad_token_id] + self.tokenizer(t)["input_ids"] for t in texts]
        longest = max(map(len, ids))
        return torch.tensor([row + [self.tokenizer.pad_token_id] * (longest - len(row)) for row in ids])


def evaluate(tokenizer, task, targets, generated, batch_size=3, **loader_kwargs):
    sources = [f"sentence: {i}" for i in range(len(targets))]
    loader = seq2seq.make_loader(text_split(sources, targets), tokenizer, 32, 32, batch_size, **loader_kwargs)
    model = FakeGenerator(tokenizer, generated)
    metrics = generation_eval.evaluate_generation(model, loader, tokenizer, task, num_beams=1, max_new_tokens=5)
    assert model.training and not model.outputs  # back in training mode; every row generated once
    return metrics


def test_all_correct_scores_one(tokenizer):
    assert evaluate(tokenizer, "rte", ["0", "1", "1", "0"], ["0", "1", "1", "0"]) == {"accuracy": 1.0}
    assert evaluate(tokenizer, "mrpc", ["1", "0"], ["1", "0"]) == {"accuracy": 1.0, "f1": 1.0, "combined": 1.0}


def test_one_invalid_generation_by_hand(tokenizer):
    assert evaluate(tokenizer, "rte", ["0", "1", "1", "0"], ["0", "1", "yes", "0"]) == {"accuracy": 0.75}
    # MRPC: "maybe" counts as the opposite of its target 1 -> predictions 1 0 0 0 against 1 0 1 0: accuracy 3/4,
    # precision 1/1, recall 1/2, F1 2/3
    out = evaluate(tokenizer, "mrpc", ["1", "0", "1", "0"], ["1", "0", "maybe", "0"])
    assert out == pytest.approx({"accuracy": 0.75, "f1": 2 / 3, "combined": (0.75 + 2 / 3) / 2})
    # STS-B: an invalid score is -1.0; spearman of ranks (2 3 1 4) vs (1 2 3 4) is 1 - 6*(1+1+4)/(4*15) = 0.4
    out = evaluate(tokenizer, "stsb", ["1.0", "2.0", "3.0", "4.0"], ["1.0", "2.0", "three", "4.0"])
    assert out["spearman"] == pytest.approx(0.4)
    assert out["pearson"] == pytest.approx(pearsonr([1, 2, -1, 4], [1, 2, 3, 4])[0])


def test_references_are_the_decoded_labels_or_the_target_strings(tokenizer):
    for with_targets in (False, True):
        out = evaluate(tokenizer, "cola", ["1", "0", "1", "0"], ["1", "0", "0", "0"], with_targets=with_targets)
        assert out["matthews"] == pytest.approx(1 / 3**0.5)  # TP 1, TN 2, FN 1: (2 - 0) / sqrt(1 * 2 * 2 * 3)
    # labels truncated to 3 tokens (2 pieces and </s>) decode to a shorter reference than the text
    sources, targets = ["sentence: 0"], ["the cat sat on the mat"]
    truncated = seq2seq.make_loader(text_split(sources, targets), tokenizer, 32, 3, 1)
    whole = seq2seq.make_loader(text_split(sources, targets), tokenizer, 32, 3, 1, with_targets=True)
    model = FakeGenerator(tokenizer, ["x", "x"])
    (_, [short]), (_, [text]) = (generation_eval.generate_texts(model, loader, tokenizer, 1, 4) for loader in (truncated, whole))
    assert text == "the cat sat on the mat" and len(short) < len(text) and text.startswith(short)


def test_generation_tasks_by_hand(tokenizer):
    pytest.importorskip("rouge_score")
    pytest.importorskip("sacrebleu")
    summaries = ["the cat sat", "a dog ran"]
    out = evaluate(tokenizer, "xsum", summaries, summaries, batch_size=1)
    assert out == pytest.approx({"rouge1": 1, "rouge2": 1, "rougeL": 1, "rougeLsum": 1, "combined": 1})
    out = evaluate(tokenizer, "xsum", ["the cat sat", "a dog ran"], ["the cat sat", "zzz"])  # rouge1 (1 + 0) / 2
    assert out["rouge1"] == pytest.approx(0.5) and out["rouge2"] == pytest.approx(0.5)
    assert evaluate(tokenizer, "wmt16_ro_en", ["The house is big."], ["The house is big."]) == pytest.approx({"bleu": 1})
    assert evaluate(tokenizer, "wmt16_ro_en", ["The house is big."], ["zzz qqq"]) == {"bleu": 0.0}


def test_average_metrics_by_hand():
    per_task = {
        "mrpc": {"accuracy": 0.8, "f1": 0.9, "combined": 0.85},
        "cola": {"matthews": 0.5},
        "stsb": {"pearson": 0.7, "spearman": 0.6, "combined": 0.65},
    }
    assert generation_eval.average_metrics(per_task) == pytest.approx((0.8 + 0.9 + 0.5 + 0.7 + 0.6) / 5)
    with pytest.raises(ValueError, match="at least one"):
        generation_eval.average_metrics({})


def tiny_t5(tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer), d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config)


def test_a_tiny_random_t5_generates_and_is_scored(tokenizer, tmp_path):
    model = tiny_t5(tokenizer)
    model.train()
    split = seq2seq.as_text_to_text(
        "mrpc", datasets.Dataset.from_dict({"text_a": ["a cat", "the mat", "sat"], "text_b": ["x", "y", "z"], "label": [1, 0, 1]})
    )
    loader = seq2seq.make_loader(split, tokenizer, 32, 8, batch_size=2)
    out = generation_eval.evaluate_generation(model, loader, tokenizer, "mrpc", num_beams=1, max_new_tokens=4)
    assert set(out) == {"accuracy", "f1", "combined"} and all(0 <= v <= 1 for v in out.values()) and model.training
    generated, references = generation_eval.generate_texts(model, loader, tokenizer, num_beams=2, max_new_tokens=3)
    assert len(generated) == 3 and references == ["1", "0", "1"]
    batch = next(iter(seq2seq.make_loader(split, tokenizer, 32, 8, batch_size=3, with_targets=False)))
    loss = model(**batch).loss  # the labels' -100 are what T5's loss ignores
    assert torch.isfinite(loss)
