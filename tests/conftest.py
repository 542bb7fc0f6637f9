"""Shared fixtures: tiny raw BraTS datasets written in each release's layout."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from mtcmkd.brats import CHANNELS, release

# DeepSpeed compiles its CPU communication op into TORCH_EXTENSIONS_DIR (default
# ~/.cache/torch_extensions), and the build records the interpreter's path: two virtual
# environments sharing the default rebuild it in turn and wait on each other's lock for
# minutes. Tests use a folder of their own environment (subprocesses inherit it).
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      str(Path(sys.prefix) / "torch_extensions"))
from mtcmkd.phantom import write_case, write_msd_dataset_json

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2021-sample"

#: torch.compile's CPU backend (inductor) builds C++: skip where no compiler is installed.
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                               reason="torch.compile (inductor) needs a C++ compiler on the CPU")


def load_script(path: Path) -> ModuleType:
    """A script of benchmarks/ or experiments/ (not a package) imported as a module, registered
    in sys.modules under its file's stem (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def blob_case(shape: tuple[int, int, int] = (24, 28, 20), seed: int = 0, has_et: bool = True):
    """A small case with a box-shaped brain and a 3-compartment spherical tumour.

    Duck-types `mtcmkd.phantom.PhantomCase` (images, label, has_et) without the phantom's cost.
    """
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    brain = np.zeros(shape, dtype=bool)
    brain[2:-2, 3:-3, 2:-2] = True
    centre = np.array(shape) // 2 + rng.integers(-2, 3, size=3)
    r = np.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2)
    label = np.zeros(shape, dtype=np.uint8)
    label[r < 6] = 2
    label[r < 4] = 3 if has_et else 1
    label[r < 2] = 1
    images = {}
    for i, name in enumerate(CHANNELS):
        img = (300.0 + 100 * i + 40 * label + rng.normal(0, 5, shape)).astype(np.float32)
        images[name] = np.where(brain, np.maximum(img, 1.0), 0.0).astype(np.float32)
    return SimpleNamespace(images=images, label=label, has_et=has_et)


def write_raw(out: Path, layout: str, n: int = 3, shape=(24, 28, 20)) -> list[str]:
    """Write `n` blob cases under `out` in `layout`; returns the case ids."""
    info = release(layout)
    ids = [write_case(out, info, i, blob_case(shape, seed=i, has_et=i % 3 != 2))
           for i in range(n)]
    if info.four_d:
        write_msd_dataset_json(out, ids)
    return ids


@pytest.fixture
def one_thread_and_seed() -> Iterator[None]:
    """One torch thread and seed 0 for the test (bit-stable CPU results), then the old count
    (modules use it with `pytestmark = pytest.mark.usefixtures("one_thread_and_seed")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def raw2021(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    write_raw(raw, "2021", n=3)
    return raw


def tree_digest(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under `root` (for identical-content checks)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def forget_deepspeed_groups() -> None:
    """Drop the process groups DeepSpeed caches at module level (tests only).

    `mtcmkd train` runs once per process, but the in-process tests (tests/test_engine.py,
    tests/test_mdsd.py) create and destroy a gloo group per module: DeepSpeed would otherwise hand
    the next engine the world group of a destroyed process group ("Group ... is not registered").
    """
    from deepspeed.utils import groups

    groups._WORLD_GROUP = None
    groups._DATA_PARALLEL_GROUP = None
    groups._MODEL_PARALLEL_GROUP = None
    groups._TENSOR_MODEL_PARALLEL_GROUP = None
    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    for cache in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                  groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
                  groups._ALL_TO_ALL_GROUP):
        cache.clear()


#: What a launcher sets for `mtcmkd train`; the in-process fixtures set and restore these.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")


@contextlib.contextmanager
def gloo_world_of_one() -> Iterator[None]:
    """A gloo process group of world size 1 in this process, as `mtcmkd train` without a
    launcher sets it up; the launch environment, the group and DeepSpeed's cached groups are
    restored afterwards. A group that already exists is used and left in place."""
    import torch

    from mtcmkd.engine.dist import free_port

    saved = {k: os.environ.get(k) for k in LAUNCH_ENV}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
    fresh = not torch.distributed.is_initialized()
    if fresh:
        forget_deepspeed_groups()
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        if fresh:
            torch.distributed.destroy_process_group()
            forget_deepspeed_groups()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

