"""propetl.data.batches: epoch batch orders, length grouping on real RTE/CoLA data, the batches built from them."""
from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg

from propetl.data.batches import PadCollator, batch_order, make_loader, token_lengths, tokenise
from propetl.data.glue import load_glue
from propetl.models.backbone import load_tokenizer

LENGTHS = [(7 * i) % 61 + 3 for i in range(1000)]      # 1000 examples of 3..63 tokens, interleaved


def padded_tokens(batches, lengths) -> int:
    return sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)


@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["random", "grouped"])
def test_every_example_once_in_full_batches(lengths):
    batches = batch_order(1000, 32, torch.Generator().manual_seed(0), lengths)
    assert sorted(i for batch in batches for i in batch) == list(range(1000))
    assert len(batches) == 32 and sorted(len(b) for b in batches) == [8] + [32] * 31


@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["random", "grouped"])
def test_order_is_fixed_by_the_generator_state(lengths):
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    first, second = batch_order(1000, 32, generator, lengths), batch_order(1000, 32, generator, lengths)
    assert first != second                                 # a new epoch, a new order
    generator.set_state(state)
    assert batch_order(1000, 32, generator, lengths) == first   # what the loop's resume relies on


def test_grouping_packs_similar_lengths_in_random_batch_order():
    generator = torch.Generator().manual_seed(0)
    grouped, shuffled = batch_order(1000, 32, generator, LENGTHS), batch_order(1000, 32, generator)
    assert padded_tokens(grouped, LENGTHS) < 0.7 * padded_tokens(shuffled, LENGTHS)
    longest = [max(LENGTHS[i] for i in batch) for batch in grouped]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)   # not longest-first


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(compose_cfg().model)


@pytest.mark.parametrize("name", ["rte", "cola"])
def test_grouped_loader_on_real_data(glue_dir, tokenizer, name):
    """On the real training sets grouped batches see every example once and pad far less."""
    train = load_glue(compose_cfg([f"task={name}"]).task, glue_dir)["train"]
    tokenised = tokenise(train, tokenizer, 128)
    lengths, collate = token_lengths(tokenised), PadCollator(tokenizer, False)
    assert len(lengths) == len(train) and max(lengths) <= 128

    def epoch(group: bool):
        order = batch_order(len(train), 32, torch.Generator().manual_seed(1), lengths if group else None)
        batches = [collate([tokenised[i] for i in indices]) for indices in order]
        assert len(batches) == -(-len(train) // 32)
        assert sum(len(b["labels"]) for b in batches) == len(train)
        return sum(b["input_ids"].numel() for b in batches), sum(int(b["attention_mask"].sum()) for b in batches)

    (grouped, real), (shuffled, real_again) = epoch(True), epoch(False)
    assert real == real_again == sum(lengths)              # the same tokens, less padding around them
    assert grouped < 0.65 * shuffled


@pytest.mark.parametrize("name", ["rte", "cola"])
def test_tokenised_once_gives_the_batches_the_tokenizer_gives(glue_dir, tokenizer, name):
    """Tokenising the split once, then padding each batch, is the tokenizer's own padding="longest" batch."""
    rows = load_glue(compose_cfg([f"task={name}"]).task, glue_dir)["train"].select(range(40))
    loader = make_loader(rows, tokenizer, 64, False, 20)
    for start, batch in zip((0, 20), loader):
        part = rows[start:start + 20]
        expected = tokenizer(part["text_a"], part.get("text_b"), padding="longest", truncation=True, max_length=64,
                             return_tensors="pt")
        assert batch.keys() == {*expected.keys(), "labels"}
        assert all(torch.equal(batch[key], expected[key]) for key in expected)
        assert batch["labels"].tolist() == part["label"]
