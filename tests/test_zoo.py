"""Released names, `prepretrain convert`, timm hub folders, resolution from the file, refused pickles."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from prepretrain.cli import main
from prepretrain.files import UnsafeCheckpoint
from prepretrain.models import load_encoder
from prepretrain.models.checkpoints import read_state_dict
from prepretrain.models.convert import convert
from prepretrain.models.layouts import detect_layout
from prepretrain.models.resolve import resolve_encoder, resolve_weights
from prepretrain.models.zoo import MODELS_ENV, RELEASES, locate, release


def torchvision_micro(num_classes: int = 10, image_size: int = 32) -> TorchvisionViT:
    """A torchvision ViT with vit_micro4's shapes (patch 4, width 128, 6 blocks, 4 heads, MLP 512)."""
    torch.manual_seed(0)
    return TorchvisionViT(image_size=image_size, patch_size=4, num_layers=6, num_heads=4, hidden_dim=128,
                          mlp_dim=512, num_classes=num_classes).eval()


def swag_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision names -> SWAG's own: sequence-first position embedding, layer_{i}, mlp.linear_*, head.layers."""
    out = {}
    for key, value in state.items():
        if key == "encoder.pos_embedding":
            value = value.permute(1, 0, 2).contiguous()
        key = key.replace("encoder.layers.encoder_layer_", "encoder.layers.layer_")
        key = key.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2.")
        key = key.replace("heads.head.", "head.layers.head.")
        out[key] = value
    return out


# ------------------------------------------------------------------------------- releases


def test_every_released_name_says_what_it_holds():
    assert len(RELEASES) == 21  # MAWS, MAE, MAWS finetunes x 5 sizes; 4 MAWS-CLIP; MAE IN1k 2B; MAE IN21k L
    h14_ft = release("maws:vit_h14_ft_in1k")
    assert (h14_ft.model, h14_ft.image_size, h14_ft.num_classes, h14_ft.global_pool) == ("vit_h14", 518, 1000, "token")
    assert release("maws:vit_b16_ft_in1k").image_size == 512 and release("maws:vit_b16").image_size == 224
    assert release("maws_clip:vit_b16_xlmr_b").text_model == "xlmr_base"
    assert release("mae:vit_6.5b14").file == "pretrain/mae/vit_6.5b14.pt"


def test_released_names_find_local_files_and_say_where_they_looked(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    target = folder / "pretrain" / "maws" / "vit_b16.pt"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    monkeypatch.setenv(MODELS_ENV, str(folder))
    assert locate("maws:vit_b16")[1] == target
    other = tmp_path / "elsewhere.pt"
    other.write_bytes(b"x")
    assert locate(f"maws:vit_l16@{other}")[1] == other
    with pytest.raises(FileNotFoundError, match="dl.fbaipublicfiles.com/maws/pretrain/maws/vit_h14.pt"):
        locate("maws:vit_h14")
    with pytest.raises(FileNotFoundError, match="known: "):
        locate("maws:vit_b17")
    weights = resolve_weights("maws:vit_b16")
    assert weights.path == target and weights.model == "vit_b16" and weights.image_size == 224


def test_a_released_finetune_runs_at_its_own_resolution(tmp_path, monkeypatch):
    """encoder=maws:..._ft_in1k without image_size= runs at 512/518 px, as the file was trained."""
    folder = tmp_path / "models"
    monkeypatch.setenv(MODELS_ENV, str(folder))
    entry = release("maws:vit_b16_ft_in1k")
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", img_size=512, num_classes=1000)
    # The header is what resolution is read from; the values do not matter for this check.
    state = {k: torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in model.state_dict().items()}
    path = folder / entry.file
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    spec = resolve_encoder("maws:vit_b16_ft_in1k")
    assert (spec.model, spec.image_size, spec.depth) == ("vit_b16", 512, 12)


def test_a_finetuned_file_without_metadata_runs_at_the_resolution_of_its_position_embedding(tmp_path):
    vit = timm.create_model("vit_base_patch16_224", img_size=64, patch_size=4, embed_dim=128, depth=6, num_heads=4,
                            mlp_ratio=4, num_classes=7)
    path = tmp_path / "finetuned_64px.pth"
    torch.save({"model": vit.state_dict()}, path)
    spec = resolve_encoder(str(path), model="vit_micro4")
    assert spec.image_size == 64  # vit_micro4 is a 32 px model; the file says 64
    encoder = load_encoder(str(path), model="vit_micro4", num_classes=7)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(images), vit.eval()(images))


# ------------------------------------------------------------------------------- convert


def test_swag_and_torchvision_files_convert_to_timm_with_the_same_outputs(tmp_path):
    reference = torchvision_micro()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference(images)
    for layout, state in (("torchvision", reference.state_dict()), ("swag", swag_names(reference.state_dict()))):
        source = tmp_path / f"{layout}.pth"
        torch.save(state, source)
        assert detect_layout(read_state_dict(source)) == layout
        out = convert(source, tmp_path / f"{layout}_prepretrain.safetensors")
        assert resolve_weights(out).metadata["model"] == "vit_micro4"
        encoder = load_encoder(str(out), num_classes=10).eval()
        with torch.no_grad():
            torch.testing.assert_close(encoder(images), expected, rtol=1e-5, atol=1e-5)
        # encoder= takes the SWAG/torchvision file directly too
        direct = load_encoder(str(source), model="vit_micro4", num_classes=10).eval()
        with torch.no_grad():
            torch.testing.assert_close(direct(images), expected, rtol=1e-5, atol=1e-5)


def test_round_trips_are_bit_exact(tmp_path):
    source = tmp_path / "swag.pth"
    torch.save(swag_names(torchvision_micro().state_dict()), source)
    first = convert(source, tmp_path / "a.safetensors")
    vision = convert(first, tmp_path / "b.pth", to="torchvision")
    again = convert(vision, tmp_path / "c.safetensors")
    a, c = load_file(first), load_file(again)
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    reloaded = torchvision_micro()
    reloaded.load_state_dict(torch.load(vision, weights_only=True), strict=True)
    original = torchvision_micro().state_dict()
    assert all(torch.equal(reloaded.state_dict()[k], original[k]) for k in original)
    safe = convert(source, tmp_path / "same_names.safetensors", to="safetensors")
    plain, stored = torch.load(source, weights_only=True), load_file(safe)
    assert plain.keys() == stored.keys() and all(torch.equal(plain[k], stored[k]) for k in plain)


def test_a_timm_folder_loads_in_plain_timm(tmp_path):
    vit = timm.create_model("vit_base_patch16_224", img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4,
                            mlp_ratio=4, num_classes=10).eval()
    source = tmp_path / "classifier.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(source))
    folder = tmp_path / "exported"
    assert main(["convert", str(source), str(folder), "--to", "timm", "--model", "vit_micro4"]) == 0
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), vit(images))
    assert loaded.pretrained_cfg["input_size"] == (3, 32, 32)


# ------------------------------------------------------------------------------ refusals


class Payload:
    """A pickle that creates a file when unpickled: the file appearing means code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def evil_file(tmp_path: Path, name: str = "evil.pt") -> tuple[Path, Path]:
    marker = tmp_path / "PAYLOAD_RAN"
    buffer = io.BytesIO()
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 128)}, "extra": Payload(marker)}, buffer)
    path = tmp_path / name
    path.write_bytes(buffer.getvalue())
    return path, marker


def test_a_malicious_pickle_is_refused_at_every_entry(tmp_path, capsys):
    path, marker = evil_file(tmp_path)
    with pytest.raises(UnsafeCheckpoint, match="refused to load: it needs 'builtins.open'|refused to load"):
        read_state_dict(path)
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "step_00000001.pt").write_bytes(path.read_bytes())
    commands = [
        ["probe", f"encoder={path}", f"out_dir={tmp_path / 'probe'}", "num_images=200"],
        ["finetune", f"encoder={path}", f"out_dir={tmp_path / 'ft'}", "num_images=200", "steps=1"],
        ["wsp", f"init={path}", f"out_dir={tmp_path / 'wsp'}", "num_images=200", "steps=1", "progress=false"],
        ["lit", f"encoder={path}", f"out_dir={tmp_path / 'lit'}", "num_images=200", "steps=1", "progress=false"],
        ["mae", f"init={path}", f"out_dir={tmp_path / 'mae'}", "num_images=200", "steps=1", "progress=false"],
        ["zeroshot", f"model={path}", f"out_dir={tmp_path / 'zs'}", "num_images=200"],
        ["convert", str(path), str(tmp_path / "out.safetensors")],
        ["export", str(tmp_path / "run")],
    ]
    for command in commands:
        assert main(command) == 4, command
        error = capsys.readouterr().err
        assert "refused to load" in error and "Traceback" not in error, (command, error)
        assert error.count("\n") == 1, (command, error)  # one line
    assert not marker.exists()


def test_a_clip_file_with_old_torchtext_names_in_fp16_loads_as_fp32(tmp_path):
    """MAWS-CLIP files from torchtext < 0.13 name the text layers differently, and a file may be
    stored in half precision: both load, into fp32, with the original's outputs."""
    from prepretrain.models.clip import build_clip, load_clip, save_clip
    from prepretrain.models.layouts import TORCHTEXT_OLD_TO_NEW
    from prepretrain.models.tokenizers import ByteTokenizer

    torch.manual_seed(0)
    model = build_clip("vit_micro4", "text_micro", image_size=32, vision_depth=1,
                       text_overrides={"depth": 1, "vocab_size": 260}).eval()
    tokenizer = ByteTokenizer(40)
    ours = save_clip(model, tmp_path / "ours.safetensors", tokenizer.describe(), 32, "vit_micro4")
    metadata = resolve_weights(ours).metadata
    new_to_old = {new: old for old, new in TORCHTEXT_OLD_TO_NEW.items()}
    old_state = {}
    for key, value in model.state_dict().items():
        marker = "transformer.layers.layers."
        if marker in key:
            head, rest = key.split(marker)
            index, name = rest.split(".", 1)
            key = f"{head}transformer.layers.{index}.{new_to_old[name]}"
        old_state[key] = value.half().contiguous()
    old = tmp_path / "old_fp16.safetensors"
    save_file(old_state, str(old), metadata=metadata)
    loaded, _, _ = load_clip(old)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    reference = build_clip("vit_micro4", "text_micro", image_size=32, vision_depth=1,
                           text_overrides={"depth": 1, "vocab_size": 260}).eval()
    reference.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    images, tokens = torch.randn(2, 3, 32, 32), tokenizer(["a red circle", "a blue star"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_images(images), reference.encode_images(images))
        torch.testing.assert_close(loaded.encode_texts(tokens), reference.encode_texts(tokens))


def test_torchvision_vit_b_16_weights_load_as_the_paper_b16(tmp_path):
    """The real architecture: torchvision's vit_b_16 (random weights, nothing downloaded) read
    by encoder= as prepretrain's vit_b16 gives torchvision's own outputs."""
    from torchvision.models import vit_b_16

    torch.manual_seed(0)
    reference = vit_b_16(weights=None).eval()
    path = tmp_path / "vit_b_16.pth"
    torch.save(reference.state_dict(), path)
    encoder = load_encoder(str(path), model="vit_b16", num_classes=1000).eval()
    assert resolve_encoder(str(path), model="vit_b16").image_size == 224
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), reference(images), rtol=1e-4, atol=1e-4)
