"""Preprocessing speed on real BraTS cases: 1 worker vs the I/O floor, and 2-worker scaling.

The I/O floor loads the same NIfTI files with nibabel and writes the already-computed output
arrays with the same Zarr settings, with no checking, cropping or normalisation in between: what
any converter must pay. A second, stricter floor reads with the pipeline's own reader (one-buffer
gunzip, zero-copy view), so that its ratio holds the processing alone. Usage:

    python benchmarks/bench_preprocess.py --raw ../shared/data/brats2021-sample [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import zarr

from mtcmkd.brats import CHANNELS
from mtcmkd.preprocessing import convert, discover_cases, preprocess
from mtcmkd.preprocessing.convert import ConvertOptions, write_case_group


def _replicate(raw: Path, out: Path, copies: int) -> Path:
    """Symlink the cases `copies` times under fresh 2021-style ids (for the scaling measure)."""
    cases = discover_cases(raw)
    for k in range(copies):
        for j, case in enumerate(cases):
            cid = f"BraTS2021_{9000 + k * 100 + j:05d}"
            (out / cid).mkdir(parents=True)
            for role, path in case.files.items():
                os.symlink(path.resolve(), out / cid / f"{cid}_{role}.nii.gz")
    return out


def _read_like_pipeline(path: Path) -> np.ndarray:
    """The pipeline's own reader (one-buffer gunzip, zero-copy view), without checksum or checks."""
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = convert._gunzip(raw)
    img = nib.Nifti1Image.from_bytes(raw)
    data = convert._array_view(img.dataobj, raw)
    return np.asanyarray(img.dataobj) if data is None else data


FLOOR_READERS = {"nibabel": lambda p: np.asanyarray(nib.load(p).dataobj),
                 "pipeline_reader": _read_like_pipeline}


def io_floor(raw: Path, store: Path, tmp: Path, options: ConvertOptions
             ) -> dict[str, tuple[float, float]]:
    """Per reader: (wall, CPU) seconds per case to load the NIfTI files and write the arrays."""
    root = zarr.open_group(str(store), mode="r")
    times: dict[str, list[float]] = {k: [] for k in FLOOR_READERS}
    cpu: dict[str, list[float]] = {k: [] for k in FLOOR_READERS}
    for case in discover_cases(raw):
        g = root["cases"][case.case_id]
        image, label = g["image"][...], g["label"][...]
        attrs = dict(g.attrs)
        for name, read in FLOOR_READERS.items():
            out = tmp / f"floor_{case.case_id}"
            t0, c0 = time.perf_counter(), time.process_time()
            # Held until the case is written, as any converter holds a case's volumes: read
            # and dropped one by one, they would reuse one buffer and skip the page faults of
            # the other four (measured: 0 against 11k minor faults, 24 ms, per case).
            volumes = [read(case.files[role]) for role in (*CHANNELS, "seg")]
            write_case_group(out, image, label, attrs, options)
            del volumes
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            shutil.rmtree(out)
    return {k: (float(np.mean(times[k])), float(np.mean(cpu[k]))) for k in FLOOR_READERS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", type=Path, default=Path("../shared/data/brats2021-sample"))
    ap.add_argument("--copies", type=int, default=2, help="replicas of the cases for scaling")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of pipeline + floor, interleaved; medians are reported")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    results: dict = {"machine": f"{platform.node()} ({os.cpu_count()} cores)",
                     "cases": [c.case_id for c in discover_cases(args.raw)]}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        # Rounds alternate pipeline and floor, so load from elsewhere hits both alike.
        rounds: dict[str, list[float]] = {k: [] for k in ("float16", "float32", "floor",
                                                          "float16_cpu", "floor_cpu",
                                                          "reader_floor", "reader_floor_cpu")}
        for k in range(args.repeat):
            for dtype in ("float16", "float32"):
                store = tmp / f"store_{dtype}_{k}"
                c0 = time.process_time()
                rep = preprocess(args.raw, store, workers=1, image_dtype=dtype)
                cpu = (time.process_time() - c0) / len(rep.results)
                per_case = [r.seconds for r in rep.results]
                rounds[dtype].append(float(np.mean(per_case)))
                if dtype == "float16":
                    rounds["float16_cpu"].append(cpu)
                size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
                results[dtype] = {"mb_per_case": size / len(per_case) / 1e6}
            floors = io_floor(args.raw, tmp / "store_float16_0", tmp, ConvertOptions())
            for key, name in (("floor", "nibabel"), ("reader_floor", "pipeline_reader")):
                rounds[key].append(floors[name][0])
                rounds[f"{key}_cpu"].append(floors[name][1])
        for dtype in ("float16", "float32"):
            results[dtype]["s_per_case"] = float(np.median(rounds[dtype]))
        floor = float(np.median(rounds["floor"]))
        results["rounds"] = rounds
        results["io_floor_s_per_case"] = floor
        results["ratio_to_floor"] = results["float16"]["s_per_case"] / floor
        results["ratio_per_round"] = [a / b for a, b in zip(rounds["float16"], rounds["floor"],
                                                            strict=True)]
        # CPU seconds (all threads, zarr's included) per case: less sensitive to the machine's
        # other load than wall time; the pipeline's include discovering the cases.
        results["cpu_ratio_to_floor"] = (float(np.median(rounds["float16_cpu"]))
                                         / float(np.median(rounds["floor_cpu"])))
        # The stricter floor: the pipeline's own (faster) reader, so that only the processing
        # (checks, checksums, crop, z-score, labels) is left in the ratio.
        reader_floor = float(np.median(rounds["reader_floor"]))
        results["reader_floor_s_per_case"] = reader_floor
        results["ratio_to_reader_floor"] = results["float16"]["s_per_case"] / reader_floor
        results["cpu_ratio_to_reader_floor"] = (float(np.median(rounds["float16_cpu"]))
                                                / float(np.median(rounds["reader_floor_cpu"])))

        many = _replicate(args.raw, tmp / "many", args.copies)
        walls = {}
        for workers in (1, 2):
            store = tmp / f"scale_{workers}"
            t0 = time.perf_counter()
            rep = preprocess(many, store, workers=workers)
            walls[workers] = time.perf_counter() - t0
            assert not rep.failed, rep.failed
        results["scaling"] = {"n_cases": len(rep.results), "wall_1": walls[1], "wall_2": walls[2],
                              "speedup_2_workers": walls[1] / walls[2]}

    print(f"machine: {results['machine']}")
    for dtype in ("float16", "float32"):
        r = results[dtype]
        print(f"{dtype}: {r['s_per_case']:.3f} s/case, {r['mb_per_case']:.1f} MB/case")
    print(f"I/O floor: {floor:.3f} s/case; float16 pipeline / floor = "
          f"{results['ratio_to_floor']:.2f}x (per round: "
          f"{', '.join(f'{r:.2f}' for r in results['ratio_per_round'])}); CPU time "
          f"{np.median(results['rounds']['float16_cpu']):.3f} vs "
          f"{np.median(results['rounds']['floor_cpu']):.3f} s/case = "
          f"{results['cpu_ratio_to_floor']:.2f}x")
    print(f"floor with the pipeline's own reader: {reader_floor:.3f} s/case; pipeline / floor = "
          f"{results['ratio_to_reader_floor']:.2f}x (CPU time "
          f"{results['cpu_ratio_to_reader_floor']:.2f}x)")
    s = results["scaling"]
    print(f"{s['n_cases']} cases: 1 worker {s['wall_1']:.2f} s, 2 workers {s['wall_2']:.2f} s, "
          f"speed-up {s['speedup_2_workers']:.2f}x")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
