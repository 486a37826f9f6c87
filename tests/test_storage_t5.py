"""scripts/storage_t5.py reproduces ../shared/paper.md §3.3's T5-base counts from shapes alone."""

import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "storage_t5.py"


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("storage_t5", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.figures()


def test_t5_base_shapes(figures):
    assert figures["t5"] == {"params": 222_903_552, "sites": 24}


def test_glue_multitask_counts(figures):
    glue = figures["glue_multitask"]
    assert glue["plain_adapter"] == 24 * 99_136 == 2_379_264
    assert glue["plain_adapter_%"] == pytest.approx(1.067, abs=5e-4)
    assert glue["plain_adapter_%_per_task"] == pytest.approx(0.133, abs=5e-4)
    assert glue["prototype"] == 99_136
    assert glue["mask_bits"] == (8 + 24) * 98_304 == 3_145_728
    assert glue["storage_fp32_eq"] == 197_440
    assert glue["storage_%"] == pytest.approx(0.0886, abs=5e-5)
    assert glue["storage_%_per_task"] == pytest.approx(0.0111, abs=5e-5)
    assert glue["trainable"] == 99_136 + 31 * 98_304 == 3_146_560
    assert glue["trainable_%"] == pytest.approx(1.41, abs=5e-3)
    assert glue["bytes"] == 4 * 99_136 + 32 * 2 * 49_152 // 8


def test_single_task_generation_counts(figures):
    gen = figures["xsum_wmt16"]
    assert gen["plain_adapter"] == 24 * 148_320 == 3_559_680
    assert gen["plain_adapter_%"] == pytest.approx(1.597, abs=5e-4)
    assert gen["prototype"] == 1_181_184
    assert gen["prototype_%"] == pytest.approx(0.530, abs=5e-4)
    assert gen["mask_bits"] == 24 * 1_179_648 == 28_311_552
    assert gen["storage_fp32_eq"] == 2_065_920
    assert gen["storage_%"] == pytest.approx(0.927, abs=5e-4)
    assert gen["ratio_to_plain_adapter"] == pytest.approx(0.58, abs=5e-3)
    assert gen["trainable"] == 29_492_736
    assert gen["trainable_%"] == pytest.approx(13.2, abs=0.05)
