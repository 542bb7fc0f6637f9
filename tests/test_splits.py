"""Issue 16, item 2: three splits, so no reported number comes from the split that chose the model.

`preprocess` holds out a test set (`--test-fraction`, default 0.2) before dealing the folds;
training sees only the folds (train + validation); `evaluate --run` scores the test set by
default, and the validation split only when asked, labelled as optimistic.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import write_raw
from test_evaluate import make_student
from typer.testing import CliRunner

from mtcmkd.cli.main import app as main_app
from mtcmkd.data import StoreInfo, held_out_test_ids, split_cases, store_fingerprint
from mtcmkd.engine.build import check_training_store
from mtcmkd.engine.run_folder import write_splits
from mtcmkd.preprocessing import DatasetError, preprocess
from mtcmkd.preprocessing.driver import held_out_count, stable_test_cases

SHAPE = (24, 28, 20)

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(main_app, [str(a) for a in args])


def root_attrs(store: Path) -> dict:
    return zarr.open_group(str(store), mode="r").attrs.asdict()


def one_line_error(result) -> str:
    err = result.stderr.strip()
    assert result.exit_code == 2, result.output + result.stderr
    assert err.startswith("error:") and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


def drop_test_attributes(store: Path) -> None:
    """Make `store` look like one written before test sets existed (its folds unchanged)."""
    meta = store / "zarr.json"
    doc = json.loads(meta.read_text())
    for key in ("test_cases", "test_fraction"):
        doc["attributes"].pop(key)
    meta.write_text(json.dumps(doc, indent=2))


# ----------------------------------------------------------------------- the deal itself


@pytest.mark.parametrize(("n", "expected"), [
    (0, 0), (1, 0), (4, 0),  # too few cases for a test set
    (5, 1), (7, 1), (8, 2), (12, 2), (13, 3), (160, 32),  # 20%, rounded half up, at least 1
])
def test_held_out_count(n, expected):
    assert held_out_count(n, 0.2) == expected


def test_held_out_count_edges():
    assert held_out_count(100, 0.0) == 0
    assert held_out_count(5, 0.01) == 1  # a positive fraction holds out at least one case
    assert held_out_count(5, 0.9) == 3  # two cases always stay for the folds


def test_test_set_is_deterministic_per_seed():
    ids = [f"BraTS2021_{i:05d}" for i in range(40)]
    a = stable_test_cases(ids, 0.2, seed=3, previous_test=None)
    assert a == sorted(a) and len(a) == 8
    assert a == stable_test_cases(list(reversed(ids)), 0.2, seed=3, previous_test=None)
    assert a != stable_test_cases(ids, 0.2, seed=4, previous_test=None)
    # its own stream: not the first cases of the folds' shuffle
    order = np.random.default_rng(3).permutation(len(ids))
    assert a != sorted(ids[j] for j in order[:8])


def test_test_set_is_stable_when_cases_are_added():
    old = [f"c{i:02d}" for i in range(10)]
    first = stable_test_cases(old, 0.2, 0, None)
    assert len(first) == 2
    more = old + [f"c{i:02d}" for i in range(10, 20)]
    second = stable_test_cases(more, 0.2, 0, first, old)
    assert set(first) <= set(second) and len(second) == 4  # near the target share
    assert not (set(second) - set(first)) & set(old)  # no fold case became a test case
    # a removed test case just leaves; too few new cases leave the set short, never a fold case
    third = stable_test_cases(old[1:] + ["c99"], 0.2, 0, first, old)
    assert set(third) <= set(first) | {"c99"}


# ---------------------------------------------------------------- the store preprocess writes


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A store of 6 labelled cases, then 4 more added: (store, first ids, added ids, reports)."""
    root = tmp_path_factory.mktemp("splits")
    more = root / "more"
    ids = sorted(write_raw(more, "2021", n=10, shape=SHAPE))
    raw, store = root / "raw", root / "store"
    raw.mkdir()
    for cid in ids[:6]:
        shutil.copytree(more / cid, raw / cid)
    first = preprocess(raw, store, n_folds=2)
    before = root_attrs(store)
    for cid in ids[6:]:
        shutil.copytree(more / cid, raw / cid)
    second = preprocess(raw, store)
    return {"root": root, "raw": raw, "store": store, "ids": ids, "before": before,
            "first": first, "second": second}


def test_a_new_store_holds_out_a_test_set(grown):
    before = grown["before"]
    assert before["test_fraction"] == 0.2 and len(before["test_cases"]) == 1
    assert before["test_cases"] == stable_test_cases(grown["ids"][:6], 0.2, 0, None)
    # the folds are dealt over the other cases only
    assert set(before["folds"]["assignment"]) == set(grown["ids"][:6]) - set(before["test_cases"])
    assert grown["first"].test["n_test"] == 1 and grown["first"].to_json()["test"]["n_test"] == 1


def test_adding_cases_keeps_every_role(grown):
    before, after = grown["before"], root_attrs(grown["store"])
    assert set(before["test_cases"]) <= set(after["test_cases"])
    assert len(after["test_cases"]) == held_out_count(10, 0.2) == 2
    new_test = set(after["test_cases"]) - set(before["test_cases"])
    assert new_test <= set(grown["ids"][6:])
    old_folds, new_folds = before["folds"]["assignment"], after["folds"]["assignment"]
    assert {c: new_folds[c] for c in old_folds} == old_folds
    report = grown["second"].test
    assert report["kept"] == 1 and report["dealt"] == sorted(new_test)
    assert report["redealt_from"] is None and not report["created"] and not report["from_folds"]


def test_train_validation_and_test_are_disjoint(grown):
    info = StoreInfo.read(grown["store"])
    test = held_out_test_ids(info)
    assert test == list(info.test_cases) and test
    for fold in range(info.n_folds):
        train, val = split_cases(info, fold)
        assert not set(train) & set(val) and not set(train) & set(test)
        assert not set(val) & set(test)
        assert sorted(train + val + test) == sorted(info.labelled_cases)


def test_training_never_sees_the_test_cases(grown, tmp_path):
    info, train, val = check_training_store(grown["store"], 0)
    assert not (set(train) | set(val)) & set(info.test_cases)
    write_splits(tmp_path, grown["store"], store_fingerprint(grown["store"]), 0, train, val,
                 info.test_cases)
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert list(splits) == ["store", "store_fingerprint", "fold", "train", "validation", "test"]
    assert splits["test"] == sorted(info.test_cases) and splits["train"] == train


def test_split_cases_leaves_out_test_cases_even_with_a_fold():
    info = StoreInfo(channels=("t1ce",), cases=("a", "b", "c", "d"),
                     labelled_cases=("a", "b", "c", "d"), folds={"a": 0, "b": 1, "c": 0, "d": 1},
                     n_folds=2, fold_seed=0, regions={"WT": (1, 2, 3)}, test_cases=("d",))
    assert split_cases(info, 1) == (["a", "c"], ["b"])


def test_fingerprint_covers_the_test_assignment(grown, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(grown["store"], store)
    original = store_fingerprint(store)
    meta = store / "zarr.json"
    doc = json.loads(meta.read_text())
    attrs = doc["attributes"]
    moved = attrs["test_cases"][0]
    attrs["test_cases"] = attrs["test_cases"][1:]  # one test case moved into a fold
    attrs["folds"]["assignment"][moved] = 0
    meta.write_text(json.dumps(doc))
    changed = store_fingerprint(store)
    assert changed != original
    # the folds alone are the same as before: only the test assignment differs
    attrs["test_cases"] = [moved]
    meta.write_text(json.dumps(doc))
    assert store_fingerprint(store) != changed


# ------------------------------------------------------------------ stores from before


def test_a_store_without_test_cases_reads_and_keeps_its_fingerprint(tmp_path):
    raw, store = tmp_path / "raw", tmp_path / "store"
    write_raw(raw, "2021", n=6, shape=SHAPE)
    preprocess(raw, store, n_folds=2, test_fraction=0.0)
    assert root_attrs(store)["test_cases"] == []
    drop_test_attributes(store)  # as written before test sets existed
    info = StoreInfo.read(store)  # still reads: it simply has no test set
    assert info.test_cases == () and held_out_test_ids(info) == []
    train, val = split_cases(info, 0)
    assert sorted(train + val) == sorted(info.labelled_cases)
    old = store_fingerprint(store)
    preprocess(raw, store, test_fraction=0.0)
    assert store_fingerprint(store) == old  # an empty test set is not hashed: runs stay valid

    drop_test_attributes(store)
    result = runner.invoke(main_app, ["preprocess", str(raw), str(store)])
    assert result.exit_code == 0, result.output
    assert "test set created" in result.output and "had a fold" in result.output
    attrs = root_attrs(store)
    assert len(attrs["test_cases"]) == 1 and attrs["test_fraction"] == 0.2
    assert not set(attrs["test_cases"]) & set(attrs["folds"]["assignment"])
    assert sorted(np.bincount(list(attrs["folds"]["assignment"].values()))) == [2, 3]
    assert store_fingerprint(store) != old


def test_another_fraction_re_deals_the_test_set_and_says_so(tmp_path):
    raw, store = tmp_path / "raw", tmp_path / "store"
    write_raw(raw, "2021", n=10, shape=SHAPE)
    preprocess(raw, store, n_folds=2)
    result = runner.invoke(main_app, ["preprocess", str(raw), str(store),
                                           "--test-fraction", "0.3"])
    assert result.exit_code == 0, result.output
    assert "test set re-dealt" in result.output
    saved = json.loads((store / "preprocess_report.json").read_text())
    assert saved["test"]["redealt_from"] == {"fraction": 0.2, "seed": 0}
    assert saved["test"]["folds_redealt"] is True
    attrs = root_attrs(store)
    assert len(attrs["test_cases"]) == 3
    # re-dealt = dealt as a new store with these options: no hole left in the folds
    preprocess(raw, tmp_path / "fresh", n_folds=2, test_fraction=0.3)
    fresh = root_attrs(tmp_path / "fresh")
    assert (attrs["test_cases"], attrs["folds"]) == (fresh["test_cases"], fresh["folds"])


@pytest.mark.parametrize(("args", "said"), [
    (["--test-fraction", "1"], "--test-fraction must be in [0, 1)"),
    (["--test-fraction", "-0.1"], "--test-fraction must be in [0, 1)"),
    (["--folds", "6", "--test-fraction", "0.2"], "held out as the test set"),
])
def test_bad_test_fraction_is_one_line(tmp_path, args, said):
    raw, store = tmp_path / "raw", tmp_path / "store"
    write_raw(raw, "2021", n=6, shape=SHAPE)
    err = one_line_error(runner.invoke(main_app, ["preprocess", str(raw), str(store), *args]))
    assert said in err, err
    assert not store.exists()


def test_library_refuses_a_bad_fraction(tmp_path):
    with pytest.raises(DatasetError, match="--test-fraction"):
        preprocess(tmp_path / "raw", tmp_path / "store", test_fraction=1.5)


# ------------------------------------------------------------------------------ evaluate


@pytest.fixture(scope="module")
def run(grown, tmp_path_factory):
    """A run folder on the grown store with the splits.json training writes."""
    path = make_student(tmp_path_factory.mktemp("run") / "run", grown["store"], kind="kdnet",
                        widths=(2, 4, 6))
    info, train, val = check_training_store(grown["store"], 0)
    write_splits(path, grown["store"], store_fingerprint(grown["store"]), 0, train, val,
                 info.test_cases)
    return path


def test_evaluate_scores_the_test_split_by_default(run, tmp_path):
    result = invoke("evaluate", "--year", "2021", "--run", run, "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output + result.stderr
    assert "split: test" in result.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    test = json.loads((run / "splits.json").read_text())["test"]
    assert metrics["split"] == "test" and metrics["source"]["split"] == "test"
    assert metrics["case_ids"] == test == [c["case"] for c in metrics["cases"]]
    assert "split_note" not in metrics


@pytest.mark.parametrize("spelling", ["validation", "val"])
def test_validation_split_is_asked_for_and_labelled(run, tmp_path, spelling):
    result = invoke("evaluate", "--year", "2021", "--run", run, "--split", spelling,
                    "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output + result.stderr
    assert "split: validation" in result.output and "selected the model" in result.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["split"] == "validation" and "selected the model" in metrics["split_note"]
    assert metrics["case_ids"] == json.loads((run / "splits.json").read_text())["validation"]


def test_no_test_set_is_a_one_line_error(grown, run, tmp_path):
    # a run whose store had no test set (an old store, or --test-fraction 0)
    old = tmp_path / "old"
    shutil.copytree(run, old)
    splits = json.loads((old / "splits.json").read_text())
    splits["test"] = []
    (old / "splits.json").write_text(json.dumps(splits))
    err = one_line_error(invoke("evaluate", "--year", "2021", "--run", old,
                                "--out", tmp_path / "e"))
    assert "no test set" in err and "--test-fraction" in err and "--split validation" in err
    assert not (tmp_path / "e").exists()
    # a run from before splits.json: no recorded test set either
    (old / "splits.json").unlink()
    err = one_line_error(invoke("evaluate", "--year", "2021", "--run", old))
    assert "no test set" in err and "predates recorded splits" in err


def test_unknown_split_is_one_line(run):
    err = one_line_error(invoke("evaluate", "--year", "2021", "--run", run, "--split", "train"))
    assert "expected test, validation or all" in err
