"""Opening and drawing from big sources: seconds to the first batch and resident memory.

    python benchmarks/open_sources.py --sizes 100000 1000000 10000000 --work /tmp/open_bench

For each size N it writes (once, into --work) a JSONL manifest of N rows (paths cycling over
64 real JPEGs, hashtags and a caption per row, ~95 bytes a row) and a shard set of N samples
(one 1000-sample shard hard-linked N/1000 times, with an index.json), then measures, each in a
fresh process so memory is not shared between measurements:

- manifest, before (the manifest reader of commit 4fd5ae0, which parsed and validated every
  row when opened) and now (a row-offset index built in one streaming pass the first time,
  memory-mapped afterwards): seconds to open (first and second open), resident memory added by
  opening, seconds to the first batch of 256 through the training loader (0 and 2 workers),
  and the workers' proportional set size (Pss: pages shared with the parent count once);
- shards: seconds to open and to the first batch, the same memory figures.

Then it extrapolates linearly to 3 * 10^9 images. Figures are printed as a table (Markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PAPER = 3_000_000_000
BASELINE_COMMIT = "4fd5ae0"


def write_inputs(work: Path, size: int) -> dict[str, Path]:
    from PIL import Image

    images = work / "img"
    if not images.is_dir():
        images.mkdir(parents=True)
        for i in range(64):
            Image.new("RGB", (48, 40), (i * 4, 255 - i * 4, 90)).save(images / f"{i}.jpg", quality=90)
    manifest = work / f"m{size}.jsonl"
    if not manifest.is_file():
        tmp = manifest.with_suffix(".tmp")
        with open(tmp, "w") as handle:
            for start in range(0, size, 100_000):
                handle.write("".join(
                    f'{{"path": "img/{i % 64}.jpg", "hashtags": ["#t{i % 997}", "#u{i % 89}"], '
                    f'"caption": "a photo {i}"}}\n' for i in range(start, min(size, start + 100_000))))
        tmp.rename(manifest)
    shards = work / f"s{size}"
    if not (shards / "index.json").is_file():
        from prepretrain.data.readers.folders import ManifestSource
        from prepretrain.data.shards.write import write_shards

        seed_dir = work / "one_shard"
        if not (seed_dir / "shard-000000.tar").is_file():
            small = work / "m1000.jsonl"
            small.write_text("".join(f'{{"path": "img/{i % 64}.jpg", "hashtags": ["#t{i}"], "caption": "c {i}"}}\n'
                                     for i in range(1000)))
            write_shards(ManifestSource(small), seed_dir, samples_per_shard=1000, verbose=False)
        shards.mkdir(parents=True, exist_ok=True)
        count = size // 1000
        for k in range(count):
            target = shards / f"shard-{k:06d}.tar"
            if not target.exists():
                os.link(seed_dir / "shard-000000.tar", target)
        index = json.loads((seed_dir / "index.json").read_text())
        index["shards"] = [{"name": f"shard-{k:06d}.tar", "count": 1000} for k in range(count)]
        index["total"] = 1000 * count
        (shards / "index.json").write_text(json.dumps(index))
    return {"manifest": manifest, "shards": shards}


PROBE = textwrap.dedent('''
    import json, os, sys, time, importlib.util
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    def pss(pid):
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    path, workers, baseline = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    import torch
    torch.set_num_threads(1)
    from prepretrain.data.loader import RecordDataset, SampleStream, train_loader
    from prepretrain.data.readers.open import open_data
    from prepretrain.data.images.transforms import eval_transform
    before = rss()
    start = time.perf_counter()
    if baseline:
        spec = importlib.util.spec_from_file_location("old_sources", baseline)
        module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
        source = module.ManifestSource(path)
    else:
        source = open_data(path, split="train")
    opened = time.perf_counter() - start
    opened_rss = rss() - before
    transform = eval_transform(32, crop_fraction=1.0)
    out = {"open_s": opened, "open_rss_mb": opened_rss}
    if workers >= 0:  # map sources and shards: the same call the engine makes
        dataset = RecordDataset(source, lambda r: {"image": transform(r.image)})
        loader = train_loader(dataset, SampleStream(len(source), 256, seed=0), workers)
        it = iter(loader)
        next(it)
        out["first_batch_s"] = time.perf_counter() - start
        out["rss_mb"] = rss() - before
        out["workers_pss_mb"] = [pss(w.pid) for w in getattr(it, "_workers", [])]
    print("RESULT" + json.dumps(out))
''')


def probe(kind: str, path: Path, workers: int, baseline: str = "") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PROBE, kind, str(path), str(workers), baseline],
                            capture_output=True, text=True, env=env, timeout=3600)
    for line in result.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    raise RuntimeError(f"probe failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--work", default="/tmp/prepretrain_open_bench")
    parser.add_argument("--baseline-max", type=int, default=10_000_000, help="largest size the old reader is run on")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["PREPRETRAIN_CACHE"] = str(work / "cache")
    repo = Path(__file__).resolve().parents[1]
    old = work / "sources_before.py"
    before = f"{BASELINE_COMMIT}:src/prepretrain/data/sources.py"
    old.write_text(subprocess.run(["git", "-C", str(repo), "show", before], capture_output=True, text=True,
                                  check=True).stdout)
    rows = []
    for size in args.sizes:
        inputs = write_inputs(work, size)
        manifest_mb = inputs["manifest"].stat().st_size / 2**20
        for cached in sorted((work / "cache" / "rows").glob("*.offsets")) if (work / "cache" / "rows").is_dir() else []:
            cached.unlink()  # the first open builds the index
        first = probe("manifest", inputs["manifest"], -1)
        now = probe("manifest", inputs["manifest"], 0)
        now2 = probe("manifest", inputs["manifest"], 2)
        row = {"size": size, "manifest_mb": manifest_mb, "index_build_s": first["open_s"], "open_s": now["open_s"],
               "open_rss_mb": now["open_rss_mb"], "first_batch_s": now["first_batch_s"], "rss_mb": now["rss_mb"],
               "first_batch_2w_s": now2["first_batch_s"], "workers_pss_mb": now2["workers_pss_mb"]}
        if size <= args.baseline_max:
            before = probe("manifest", inputs["manifest"], -1, str(old))
            row.update({"before_open_s": before["open_s"], "before_open_rss_mb": before["open_rss_mb"]})
        shard = probe("shards", inputs["shards"], 0)
        shard2 = probe("shards", inputs["shards"], 2)
        row.update({"shards_open_s": shard["open_s"], "shards_open_rss_mb": shard["open_rss_mb"],
                    "shards_first_batch_s": shard["first_batch_s"], "shards_first_batch_2w_s": shard2["first_batch_s"],
                    "shards_rss_mb": shard["rss_mb"], "shards_workers_pss_mb": shard2["workers_pss_mb"]})
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print("manifests (JSONL):\n")
    print("| images | MB | index build s (once) | open s | open RSS MB | 1st batch s (0 / 2 workers) | "
          "RSS MB at 1st batch | worker Pss MB | before: open s | before: open RSS MB |")
    print("|" + "---|" * 10)
    for r in rows:
        print(f"| {r['size']:.0e} | {r['manifest_mb']:.0f} | {r['index_build_s']:.2f} | {r['open_s']:.3f} | "
              f"{r['open_rss_mb']:.1f} | {r['first_batch_s']:.2f} / {r['first_batch_2w_s']:.2f} | {r['rss_mb']:.0f} | "
              f"{', '.join(f'{p:.0f}' for p in r['workers_pss_mb'])} | {r.get('before_open_s', float('nan')):.2f} | "
              f"{r.get('before_open_rss_mb', float('nan')):.0f} |")
    print("\nshards (index.json):\n")
    print("| images | open s | open RSS MB | 1st batch s (0 / 2 workers) | RSS MB at 1st batch | worker Pss MB |")
    print("|" + "---|" * 6)
    for r in rows:
        print(f"| {r['size']:.0e} | {r['shards_open_s']:.3f} | {r['shards_open_rss_mb']:.1f} | "
              f"{r['shards_first_batch_s']:.2f} / {r['shards_first_batch_2w_s']:.2f} | {r['shards_rss_mb']:.0f} | "
              f"{', '.join(f'{p:.0f}' for p in r['shards_workers_pss_mb'])} |")
    last = rows[-1]
    scale = PAPER / last["size"]
    print(f"\nlinear extrapolation to {PAPER:.0e} images from {last['size']:.0e}: index build "
          f"{last['index_build_s'] * scale / 3600:.2f} h once ({8 * PAPER / 2**30:.0f} GiB of offsets on disk, "
          f"paged in as touched); open {last['open_s']:.3f} s (constant: a stat and an mmap); "
          f"before: open {last.get('before_open_s', float('nan')) * scale / 3600:.1f} h and "
          f"{last.get('before_open_rss_mb', float('nan')) * scale / 2**20:.2f} TiB per rank")


if __name__ == "__main__":
    main()
