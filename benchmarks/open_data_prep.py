"""Costs of WSP's open-data labels at scale, on generated captions (no download needed).

    python benchmarks/open_data_prep.py captions --out /tmp/captions --count 1000000
        writes a JSONL manifest of `count` captions (web-like: 4-20 words, Zipf-distributed nouns from
        WordNet's lemmas, plurals, adjectives, stop words, 2% non-Latin words, 1% empty)
    prepretrain data vocab /tmp/captions/captions.jsonl --out v.json --labels-from synsets
        the command being measured (time it with /usr/bin/time -v for peak memory)

    python benchmarks/open_data_prep.py shards --out /tmp/capshards --count 1000000 --per-shard 10000
        the same captions as img2dataset-style shards (a 1-byte placeholder image and a .txt caption
        per sample: WSP's preparation never reads pixels)
    torchrun --nproc-per-node 4 benchmarks/open_data_prep.py prepare --data /tmp/capshards \
        --labels-from synsets --label-cache true
        times WSP's preparation (vocabulary, counts, weights, prior, copies per shard) on every rank
        and prints one JSON line per rank: wall and CPU seconds
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np

ADJECTIVES = ("red big small old new happy beautiful white black green blue wooden young little modern "
              "vintage cute dark bright tall").split()
FILLERS = ("a the on in with of and at near for two my our this".split())
FOREIGN = ["東京", "кошка", "القط", "ひまわり", "собака"]


def caption_vocabulary() -> list[str]:
    """Single-word head lemmas of timm's WordNet table: nouns people photograph, and many they do not."""
    from prepretrain.data.labels.weaklabels import default_synset_table

    words = []
    for line in default_synset_table().read_text().splitlines():
        head = line.split("\t", 1)[1].split(",")[0].strip()
        if head.isalpha() and head.islower():
            words.append(head)
    return sorted(set(words))


def captions(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    nouns = np.asarray(caption_vocabulary(), dtype=object)[rng.permutation(len(caption_vocabulary()))]
    zipf = 1.0 / np.arange(1, len(nouns) + 1) ** 1.1
    batch = 10_000
    for start in range(0, count, batch):
        size = min(batch, count - start)
        picks = iter(nouns[rng.choice(len(nouns), size=size * 6, p=zipf / zipf.sum())])
        uniform = iter(rng.random(size * 30))
        for _ in range(size):
            if next(uniform) < 0.01:
                yield ""
                continue
            words = []
            for _ in range(2 + int(next(uniform) * 5)):
                words.append(FILLERS[int(next(uniform) * len(FILLERS))])
                if next(uniform) < 0.5:
                    words.append(ADJECTIVES[int(next(uniform) * len(ADJECTIVES))])
                noun = next(picks)
                words.append(noun + "s" if next(uniform) < 0.3 else noun)
            if next(uniform) < 0.02:
                words.append(FOREIGN[int(next(uniform) * len(FOREIGN))])
            yield " ".join(words).capitalize()


def write_captions(out: Path, count: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "captions.jsonl", "w") as handle:
        for index, caption in enumerate(captions(count)):
            handle.write(json.dumps({"path": f"images/{index:09d}.jpg", "caption": caption}) + "\n")
    print(f"wrote {count} captions to {out / 'captions.jsonl'}")


def write_shards(out: Path, count: int, per_shard: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    archive = None
    for index, caption in enumerate(captions(count)):
        if index % per_shard == 0:
            if archive is not None:
                archive.close()
            archive = tarfile.open(out / f"{index // per_shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT)
        for suffix, payload in (("jpg", b"\xff"), ("txt", caption.encode())):
            info = tarfile.TarInfo(f"{index:09d}.{suffix}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    if archive is not None:
        archive.close()
    print(f"wrote {count} samples in {(count + per_shard - 1) // per_shard} shards to {out}")


def time_prepare(data: str, labels_from: str, label_cache: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
    from prepretrain.config import build_config
    from prepretrain.stages.wsp import WSPConfig, WSPStage
    from prepretrain.train.run import Run

    cfg = build_config(WSPConfig, None, dict(data=data, labels_from=labels_from, label_cache=label_cache,
                                             out_dir=out_dir, progress="false", tensorboard="false"))
    stage = WSPStage(cfg)
    run = Run(Path(out_dir), rank=rank, world_size=world)
    run.dir.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    prepared = stage.prepare(run)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"rank": rank, "world": world, "label_cache": label_cache, "labels_from": labels_from,
                      "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "images": prepared.stats["images"],
                      "vocab": len(prepared.vocab), "positions": prepared.positions}), flush=True)
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("captions", "shards"):
        command = sub.add_parser(name)
        command.add_argument("--out", required=True)
        command.add_argument("--count", type=int, default=1_000_000)
        command.add_argument("--per-shard", type=int, default=10_000)
    prepare = sub.add_parser("prepare")
    prepare.add_argument("--data", required=True)
    prepare.add_argument("--labels-from", default="synsets")
    prepare.add_argument("--label-cache", default="true")
    prepare.add_argument("--out-dir", default="/tmp/open_data_prep_run")
    args = parser.parse_args()
    if args.command == "captions":
        write_captions(Path(args.out), args.count)
    elif args.command == "shards":
        write_shards(Path(args.out), args.count, args.per_shard)
    else:
        time_prepare(args.data, args.labels_from, args.label_cache, args.out_dir)


if __name__ == "__main__":
    main()
