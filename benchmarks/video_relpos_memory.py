"""Peak memory and time of one video ViT training step (forward + backward) with the relative
position of ``VideoViT(rel_pos=True)`` as it is now (MViTv2's query-dependent form, as extra
head-dim columns of q and k, no mask) and as it was before 2026-12-07 (a query-independent bias
expanded every step into a dense (1, heads, N, N) ``attn_mask`` per block, reproduced below from
``src/prepretrain/models/video.py`` as committed before that date), plus ``rel_pos`` off, now
(``T' - 1`` copies of the CLS key) and before (a ``log T'`` mask on the CLS key).

    OMP_NUM_THREADS=1 python benchmarks/video_relpos_memory.py --frames 16 --batch 1

Each arm runs in a fresh process: ViT-B/16 at 224 px, tubelet 2, fp32, random clips, one warm-up
step then ``--steps`` timed ones; it prints the peak RSS over the steps (``VmHWM``, reset after the
model is built) less the RSS before them, on CUDA ``torch.cuda.max_memory_allocated`` over the
timed steps, and (deterministic, any device) the bytes of the activations autograd keeps for
backward in one forward (unique storages seen by ``saved_tensors_hooks``, parameters and buffers
left out) and the model's buffers (the old bias kept three (N, N) int64 offset tables per block;
they exist before the step, so the RSS increase does not include them).
The kernel column names the attention kernel autograd recorded (flash = fused, no (N, N) tensor
kept). RSS on a shared machine moves by a few hundred MB between runs for the unfused arm (its
transients are (N, N) per head); the saved-for-backward column does not move.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

import torch
from torch import nn

ARMS = ("old_rel", "new_rel", "old_off", "new_off")


class OldRelativePositionBias(nn.Module):
    """The bias that ``rel_pos=True`` added before: per block and head, ``t[h, dt] + r[h, dh] +
    c[h, dw]`` between patch tokens, expanded to (1, heads, N, N) on every forward."""

    def __init__(self, num_heads: int, grid: tuple[int, int, int], prefix: int = 1):
        super().__init__()
        slots, rows, cols = grid
        self.prefix = prefix
        self.rel_t = nn.Parameter(torch.zeros(num_heads, 2 * slots - 1))
        self.rel_h = nn.Parameter(torch.zeros(num_heads, 2 * rows - 1))
        self.rel_w = nn.Parameter(torch.zeros(num_heads, 2 * cols - 1))
        t, h, w = torch.meshgrid(torch.arange(slots), torch.arange(rows), torch.arange(cols), indexing="ij")
        for name, coord, size in (("index_t", t, slots), ("index_h", h, rows), ("index_w", w, cols)):
            flat = coord.reshape(-1)
            self.register_buffer(name, flat[:, None] - flat[None, :] + size - 1, persistent=False)

    def forward(self) -> torch.Tensor:
        patch = self.rel_t[:, self.index_t] + self.rel_h[:, self.index_h] + self.rel_w[:, self.index_w]
        return nn.functional.pad(patch, (self.prefix, 0, self.prefix, 0)).unsqueeze(0)


class OldVideoViT(nn.Module):
    """The old forward: timm's blocks called with ``attn_mask = bias + prefix_bias`` (the embedding,
    norms and head are the current VideoViT's, unchanged since)."""

    def __init__(self, image: nn.Module, frames: int, tubelet: int, rel_pos: bool):
        super().__init__()
        from prepretrain.models.video import VideoViT

        self.video = VideoViT(image, frames, tubelet)
        self.timm_blocks = image.blocks  # the same modules as video.blocks, in timm's Block
        slots = frames // tubelet
        grid = (slots, *self.video.grid)
        prefix_bias = torch.zeros(1, 1, 1, 1 + math.prod(grid))
        prefix_bias[..., :1] = math.log(slots)
        self.register_buffer("prefix_bias", prefix_bias, persistent=False)
        self.rel_pos = None
        if rel_pos:
            heads = image.blocks[0].attn.num_heads
            self.rel_pos = nn.ModuleList(OldRelativePositionBias(heads, grid) for _ in image.blocks)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        video = self.video
        x = video.norm_pre(video.patch_drop(video.embed(clips)))
        slots = self.video.temporal.pos_embed.shape[1]
        for index, block in enumerate(self.timm_blocks):
            if self.rel_pos is not None:
                x = block(x, attn_mask=(self.rel_pos[index]() + self.prefix_bias).to(x.dtype))
            else:
                x = block(x, attn_mask=self.prefix_bias.to(x.dtype)) if slots > 1 else block(x)
        return video.forward_head(video.norm(x))


def build(arm: str, frames: int, tubelet: int) -> nn.Module:
    from prepretrain.models.video import VideoViT
    from prepretrain.models.vit import create_vit

    torch.manual_seed(0)
    image = create_vit("vit_b16", num_classes=400)
    if arm.startswith("old"):
        return OldVideoViT(image, frames, tubelet, rel_pos=arm == "old_rel")
    return VideoViT(image, frames, tubelet, rel_pos=arm == "new_rel")


def attention_kernels(loss: torch.Tensor) -> str:
    names, stack, seen = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "Attention" in node.name():
            names.add(node.name().replace("Backward0", ""))
        stack.extend(n for n, _ in node.next_functions)
    return ",".join(sorted(names)) or "math (unfused: softmax/bmm)"


def loss_and_saved_mib(model: nn.Module, clips: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The loss, and the MiB of activations autograd keeps for backward (parameters and buffers,
    the model's own state, left out)."""
    parameters = {p.untyped_storage().data_ptr() for p in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = nn.functional.cross_entropy(model(clips), labels)
    return loss, sum(storages.values()) / 2**20


def rss_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in KiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measure(arm: str, frames: int, batch: int, steps: int, device: str) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = build(arm, frames, 2).to(device).train()
    clips = torch.randn(batch, 3, frames, 224, 224, device=device)
    labels = torch.randint(0, 400, (batch,), device=device)
    kernel = ""
    times = []
    with open("/proc/self/clear_refs", "w") as clear:  # resets VmHWM to the current RSS
        clear.write("5")
    before = rss_kib("VmRSS")
    for step in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
            if step == 1:
                torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if step == 0:
            loss, saved = loss_and_saved_mib(model, clips, labels)
            kernel = attention_kernels(loss)
        else:
            loss = nn.functional.cross_entropy(model(clips), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
        del loss
    peak = rss_kib("VmHWM")
    cuda = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else "-"
    tokens = 1 + (frames // 2) * 14 * 14
    buffers = sum(b.untyped_storage().nbytes() for b in model.buffers()) / 2**20
    print(f"| {arm} | {tokens} | {buffers:.0f} MiB | {saved:.0f} MiB | +{(peak - before) / 1024:.0f} MB | {cuda} | "
          f"{sum(times) / len(times):.1f} | {kernel} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.frames, args.batch, args.steps, args.device)
        return
    print(f"ViT-B/16, {args.frames} frames x 224 px, tubelet 2, batch {args.batch}, fp32, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| arm | tokens | model buffers | saved for backward | peak RSS increase | CUDA max allocated | s/step "
          "| attention kernel |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in args.arms:
        subprocess.run([sys.executable, __file__, "--measure", arm, "--frames", str(args.frames), "--batch",
                        str(args.batch), "--steps", str(args.steps), "--device", args.device], check=True)


if __name__ == "__main__":
    main()
