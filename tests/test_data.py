"""propetl.data.glue on the real GLUE files (RTE, MRPC, CoLA, STS-B, SST-2) and on small malformed files."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before datasets is imported: it reads these once
os.environ["HF_DATASETS_OFFLINE"] = "1"

from collections import Counter
from pathlib import Path

import datasets
import pytest
from omegaconf import OmegaConf

from propetl.data.glue import DataError, load_glue, resolve_data_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_GLUE = Path("/work/shared/data/glue")


@pytest.fixture(scope="module", autouse=True)
def _private_datasets_cache(tmp_path_factory):
    """The Arrow cache goes to a tmp folder, never to ~/.cache or the repo."""
    cache = str(tmp_path_factory.mktemp("hf_datasets_cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_CACHE", cache)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        yield


@pytest.fixture(scope="module")
def glue_dir() -> Path:
    candidates = [resolve_data_dir(None), os.environ.get("PROPETL_DATA_DIR"), SHARED_GLUE]
    for candidate in candidates:
        if candidate and (Path(candidate) / "RTE" / "train.tsv").is_file():
            return Path(candidate)
    reason = f"no GLUE data folder found (tried data/glue, $PROPETL_DATA_DIR, {SHARED_GLUE})"
    if os.environ.get("PROPETL_REQUIRE_DATA") == "1":
        pytest.fail(reason + " and PROPETL_REQUIRE_DATA=1")
    pytest.skip(reason)


def task(name: str):
    return OmegaConf.load(REPO_ROOT / "conf" / "task" / f"{name}.yaml")


@pytest.fixture(scope="module")
def sst2(glue_dir):
    """SST-2 is the slowest load (67k rows): once per module."""
    return load_glue(task("sst2"), glue_dir)


def rows(dataset) -> list[tuple]:
    columns = [dataset[name][:] for name in dataset.column_names]
    return list(zip(*columns))


def write_tsv(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.parametrize(
    "name, train, validation, test",
    [("rte", 2490, 138, 139), ("mrpc", 3668, 204, 204), ("cola", 8551, 521, 522), ("stsb", 5749, 750, 750)],
)
def test_small_task_split_halves_dev(glue_dir, name, train, validation, test):
    splits = load_glue(task(name), glue_dir)
    assert set(splits) == {"train", "validation", "test"}
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (train, validation, test)


def test_large_task_split_holds_out_1000_train_examples(sst2):
    assert (len(sst2["train"]), len(sst2["validation"]), len(sst2["test"])) == (66349, 1000, 872)
    assert sst2["train"].column_names == ["text_a", "label"]
    assert sst2["train"].features["label"].dtype == "int64"
    assert set(sst2["train"]["label"][:]) == {0, 1}


def test_large_task_validation_and_train_partition_train(glue_dir, sst2):
    full = load_glue(task("sst2"), glue_dir, protocol="full_dev")
    assert Counter(rows(sst2["validation"])) + Counter(rows(sst2["train"])) == Counter(rows(full["train"]))
    assert rows(sst2["test"]) == rows(full["test"])


def test_full_dev_selects_and_reports_on_dev(glue_dir):
    splits = load_glue(task("rte"), glue_dir, protocol="full_dev")
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (2490, 277, 277)
    assert rows(splits["validation"]) == rows(splits["test"])


def test_cola_dev_is_in_domain_then_out_of_domain(glue_dir):
    dev = load_glue(task("cola"), glue_dir, protocol="full_dev")["validation"]
    assert len(dev) == 1043
    assert dev[0]["text_a"] == "The sailors rode the breeze clear of the rocks."
    assert dev[527]["text_a"] == "Somebody just left - guess who."
    assert dev.column_names == ["text_a", "label"]


def test_labels_and_dtypes(glue_dir):
    rte = load_glue(task("rte"), glue_dir)["train"]
    assert rte.column_names == ["text_a", "text_b", "label"]
    assert rte.features["label"].dtype == "int64"
    assert rte[0] == {
        "text_a": "No Weapons of Mass Destruction Found in Iraq Yet.",
        "text_b": "Weapons of Mass Destruction Found in Iraq.",
        "label": 1,  # not_entailment
    }
    assert Counter(rte["label"][:]) == {0: 1249, 1: 1241}

    stsb = load_glue(task("stsb"), glue_dir)["train"]
    assert stsb.features["label"].dtype == "float32"
    assert stsb[0]["label"] == 5.0
    assert 0.0 <= min(stsb["label"][:]) and max(stsb["label"][:]) <= 5.0

    mrpc = load_glue(task("mrpc"), glue_dir)["train"]
    assert Counter(mrpc["label"][:]) == {1: 2474, 0: 1194}  # header read despite the UTF-8 BOM


def test_split_depends_only_on_the_seed(glue_dir):
    first = load_glue(task("rte"), glue_dir, split_seed=42)
    again = load_glue(task("rte"), glue_dir, split_seed=42)
    other = load_glue(task("rte"), glue_dir, split_seed=43)
    assert rows(first["validation"]) == rows(again["validation"])
    assert rows(first["test"]) == rows(again["test"])
    assert rows(first["validation"]) != rows(other["validation"])


@pytest.mark.parametrize("name", ["rte", "mrpc"])
def test_small_task_validation_and_test_partition_dev(glue_dir, name):
    splits = load_glue(task(name), glue_dir)
    dev = load_glue(task(name), glue_dir, protocol="full_dev")["validation"]
    validation, test = rows(splits["validation"]), rows(splits["test"])
    assert not set(validation) & set(test)
    assert Counter(validation) + Counter(test) == Counter(rows(dev))


def test_quotes_are_kept_verbatim(glue_dir):
    train = load_glue(task("rte"), glue_dir)["train"]
    path = glue_dir / "RTE" / "train.tsv"
    fields = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    assert train["text_a"][:] == [f[1] for f in fields]
    assert train["text_b"][:] == [f[2] for f in fields]
    assert train[50]["text_a"].startswith('"Instead of action on crime, we got the federal long gun registry,')


# ------------------------------------------------------------------------------------ errors and edges


def test_missing_data_dir_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as caught:
        load_glue(task("rte"), missing, allow_hub=False)
    message = str(caught.value)
    assert "\n" not in message
    assert "'rte'" in message and f"data.dir '{missing}' does not exist" in message
    assert "PROPETL_DATA_DIR" in message


def test_missing_task_folder_names_the_expected_file(tmp_path):
    with pytest.raises(DataError, match=r"expected .*QNLI/train\.tsv \(not found\)"):
        load_glue(task("qnli"), tmp_path, allow_hub=False)
    with pytest.raises(DataError, match="no data.dir configured"):
        load_glue(task("qnli"), None, allow_hub=False)


@pytest.mark.skipif(not datasets.config.HF_HUB_OFFLINE, reason="needs offline mode: the hub must fail fast")
def test_unreachable_hub_is_reported(tmp_path):
    with pytest.raises(DataError) as caught:
        load_glue(task("qnli"), tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert "task 'qnli'" in message and "hub (nyu-mll/glue) is unreachable" in message and "go online" in message


def test_hub_fallback_renames_columns(tmp_path, monkeypatch):
    label = datasets.ClassLabel(names=["entailment", "not_entailment"])
    features = datasets.Features(
        {
            "sentence1": datasets.Value("string"),
            "sentence2": datasets.Value("string"),
            "label": label,
            "idx": datasets.Value("int32"),
        }
    )
    split = datasets.Dataset.from_dict(
        {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [1, 0], "idx": [0, 1]}, features=features
    )
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return datasets.DatasetDict(train=split, validation=split)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = load_glue(task("rte"), tmp_path, protocol="full_dev")
    assert calls == [("nyu-mll/glue", "rte")]
    assert splits["train"].column_names == ["text_a", "text_b", "label"]
    assert splits["train"].features["label"].dtype == "int64"
    assert splits["validation"][0] == {"text_a": "a", "text_b": "c", "label": 1}


def test_file_without_a_configured_column(tmp_path):
    train = write_tsv(tmp_path / "RTE" / "train.tsv", ["index\tsentence1\tlabel", "0\ta\tentailment"])
    write_tsv(tmp_path / "RTE" / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"])
    with pytest.raises(DataError) as caught:
        load_glue(task("rte"), tmp_path)
    message = str(caught.value)
    assert str(train) in message and "'sentence2'" in message and "'index', 'sentence1', 'label'" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "name, folder, header, bad_row, expected",
    [
        ("rte", "RTE", "index\tsentence1\tsentence2\tlabel", "1\tx\ty\tmaybe", "label 'maybe' is not one of"),
        ("rte", "RTE", "index\tsentence1\tsentence2\tlabel", "1\tx\ty\t", "empty label"),
        ("sst2", "SST-2", "sentence\tlabel", "fine \t7", "outside 0..1"),
        ("stsb", "STS-B", "sentence1\tsentence2\tscore", "x\ty\tfive", "'five' is not a number"),
        ("stsb", "STS-B", "sentence1\tsentence2\tscore", "x\ty\t5.5", "5.5 is outside the task's label_range [0, 5]"),
        ("stsb", "STS-B", "sentence1\tsentence2\tscore", "x\ty\t-0.1", "-0.1 is outside the task's label_range"),
        ("stsb", "STS-B", "sentence1\tsentence2\tscore", "x\ty\t1e39", "'1e39' is not a finite float32 number"),
        ("stsb", "STS-B", "sentence1\tsentence2\tscore", "x\ty\tnan", "'nan' is not a finite float32 number"),
        ("stsb", "STS-B", "sentence1\tsentence2\tscore", "x\ty\t-inf", "'-inf' is not a finite float32 number"),
    ],
)
def test_bad_label_names_file_and_row(tmp_path, name, folder, header, bad_row, expected):
    good_row = {"rte": "0\ta\tb\tentailment", "sst2": "good \t1", "stsb": "a\tb\t2.5"}[name]
    train = write_tsv(tmp_path / folder / "train.tsv", [header, good_row, bad_row])
    write_tsv(tmp_path / folder / "dev.tsv", [header, good_row])
    with pytest.raises(DataError) as caught:
        load_glue(task(name), tmp_path, protocol="full_dev")
    message = str(caught.value)
    assert f"{train} data row 2" in message and expected in message and f"'{name}'" in message


def test_regression_labels_without_a_declared_range_may_be_any_finite_float32(tmp_path):
    config = OmegaConf.merge(task("stsb"), {"label_range": None})
    lines = ["sentence1\tsentence2\tscore", "a\tb\t-7.5", "c\td\t3e38"]
    write_tsv(tmp_path / "STS-B" / "train.tsv", lines)
    write_tsv(tmp_path / "STS-B" / "dev.tsv", lines)
    assert load_glue(config, tmp_path, protocol="full_dev")["train"]["label"][:] == pytest.approx([-7.5, 3e38])


def test_hub_labels_outside_the_range_name_the_split_and_row(tmp_path, monkeypatch):
    split = datasets.Dataset.from_dict({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [4.0, 6.0]})
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **kwargs: datasets.DatasetDict(
        train=split, validation=split))
    with pytest.raises(DataError, match=r"nyu-mll/glue/stsb:train row 2: label 6.0 is outside the task's label_range"):
        load_glue(task("stsb"), tmp_path, protocol="full_dev")


@pytest.mark.parametrize("protocol, dev_rows, split, size", [("split", 3, "validation", 1),
                                                             ("full_dev", 1, "validation", 1)])
def test_a_selection_or_test_split_of_one_row_is_refused_naming_it(tmp_path, protocol, dev_rows, split, size):
    header, row = "index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"
    write_tsv(tmp_path / "RTE" / "train.tsv", [header, row, row])
    write_tsv(tmp_path / "RTE" / "dev.tsv", [header, *[row] * dev_rows])
    with pytest.raises(DataError) as caught:
        load_glue(task("rte"), tmp_path, protocol=protocol)
    assert str(caught.value) == (f"task 'rte': the {split} split has {size} row(s) under data.protocol={protocol}; "
                                 "it needs at least 2: give the task's files more rows")
    write_tsv(tmp_path / "RTE" / "dev.tsv", [header, *[row] * 4])
    sizes = [len(rows) for rows in load_glue(task("rte"), tmp_path, protocol=protocol).values()]
    assert sizes == ([2, 2, 2] if protocol == "split" else [2, 4, 4])


def test_literal_null_and_na_stay_text(tmp_path):
    lines = ["sentence\tlabel", "null\t0", "NA\t1", "\t0", 'say "hi\t1']
    write_tsv(tmp_path / "SST-2" / "train.tsv", lines)
    write_tsv(tmp_path / "SST-2" / "dev.tsv", lines)
    splits = load_glue(task("sst2"), tmp_path, protocol="full_dev")
    assert splits["train"]["text_a"][:] == ["null", "NA", "", 'say "hi']
    assert splits["train"]["label"][:] == [0, 1, 0, 1]


def test_plain_dict_config_is_accepted(glue_dir):
    config = OmegaConf.to_container(task("rte"))
    assert isinstance(config, dict)
    assert len(load_glue(config, str(glue_dir))["test"]) == 139


def test_unknown_protocol():
    with pytest.raises(ValueError, match=r"^data.protocol='x' is not one of: split, full_dev$"):
        load_glue(task("rte"), None, protocol="x")


def test_resolve_data_dir(tmp_path, monkeypatch):
    missing = tmp_path / "missing"
    assert resolve_data_dir(str(missing)) == missing  # configured wins, even if absent
    monkeypatch.setenv("PROPETL_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    monkeypatch.delenv("PROPETL_DATA_DIR")
    linked = REPO_ROOT / "data" / "glue"
    assert resolve_data_dir(None) == (linked if linked.exists() else None)
