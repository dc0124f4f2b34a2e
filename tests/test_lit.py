"""LiT: tokenizers, the RoBERTa text tower's torchtext layout, the CLIP loss (1 and 2 ranks),
the MAWS CLIP checkpoint layout, the frozen-feature cache, and a short end-to-end run."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prepretrain.config import ConfigError, build_config
from prepretrain.models.clip import (
    CLIPModel,
    build_clip,
    build_maws_clip,
    clip_loss,
    load_clip,
)
from prepretrain.models.text import TextEncoder, TextShape, create_text_encoder, position_ids
from prepretrain.models.tokenizers import ByteTokenizer, SentencePieceTokenizer, build_tokenizer
from prepretrain.models.vit import create_vit
from prepretrain.train.run import Run

# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_frames_truncates_and_pads():
    tokenizer = ByteTokenizer(max_tokens=5)
    ids = tokenizer(["ab", "abcdefg", "é"])
    assert ids.shape == (3, 7) and ids.dtype == torch.long
    assert ids[0].tolist() == [0, 4 + 97, 4 + 98, 2, 1, 1, 1]
    assert ids[1].tolist() == [0, 4 + 97, 4 + 98, 4 + 99, 4 + 100, 4 + 101, 2]  # 5 kept, then EOS
    assert ids[2].tolist() == [0, 4 + 0xC3, 4 + 0xA9, 2, 1, 1, 1]  # UTF-8 bytes of "é"
    assert tokenizer.decode(ids[2].tolist()) == "é"
    assert tokenizer.vocab_size == 260 and build_tokenizer("bytes").context_length == 80


def _train_sentencepiece(tmp_path) -> str:
    import sentencepiece

    from prepretrain.data.synthetic.images import SyntheticSource

    source = SyntheticSource(300, image_size=16, split="train")
    sentences = [source.get(i).caption for i in range(len(source))]
    prefix = tmp_path / "tiny_spm"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(prefix), vocab_size=120, model_type="bpe",
        character_coverage=1.0, minloglevel=2,
    )
    return str(prefix) + ".model"


def test_sentencepiece_tokenizer_uses_fairseq_ids(tmp_path):
    import sentencepiece

    model_file = _train_sentencepiece(tmp_path)
    processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
    tokenizer = build_tokenizer(model_file)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert tokenizer.vocab_size == processor.get_piece_size() + 2  # 4 specials + pieces - 3 + <mask>
    assert tokenizer.context_length == 102  # MAWS: 100 tokens + BOS/EOS

    text = "a red circle Ω"  # Ω never occurs in training: SentencePiece <unk>
    pieces = processor.encode(text, out_type=int)
    assert processor.unk_id() in pieces
    expected = [3 if p == processor.unk_id() else p + 1 for p in pieces]
    row = tokenizer(text)[0].tolist()
    assert row[: len(expected) + 2] == [0, *expected, 2]
    assert set(row[len(expected) + 2 :]) == {1} and len(row) == 102
    assert tokenizer.decode(expected) == processor.decode([p for p in pieces if p != processor.unk_id()])

    long_text = " ".join(["circle"] * 300)
    long_row = tokenizer(long_text)[0]
    assert long_row[0] == 0 and long_row[-1] == 2 and long_row.ne(1).all()  # truncated to 100 + BOS/EOS


# ----------------------------------------------------------------------------- text tower


def test_position_ids_are_offset_by_the_padding_index():
    tokens = torch.tensor([[0, 9, 9, 2, 1, 1], [0, 9, 9, 9, 9, 2]])
    assert position_ids(tokens).tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 4, 5, 6, 7]]


class _ReferencePositions(nn.Module):
    def __init__(self, count: int, width: int):
        super().__init__()
        self.embedding = nn.Embedding(count, width, padding_idx=1)


class _ReferenceTransformer(nn.Module):
    """torchtext's RoBERTa TransformerEncoder rebuilt from torch.nn parts (post-norm, GELU)."""

    def __init__(self, vocab: int, width: int, depth: int, heads: int, mlp: int, positions: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width, padding_idx=1)
        layer = nn.TransformerEncoderLayer(width, heads, mlp, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=False)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.positional_embedding = _ReferencePositions(positions, width)
        self.embedding_layer_norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens.eq(1)
        real = (~pad).long()
        positions = torch.cumsum(real, dim=1) * real + 1
        x = self.embedding_layer_norm(self.token_embedding(tokens) + self.positional_embedding.embedding(positions))
        return self.layers(x, src_key_padding_mask=pad)


class _ReferenceEncoder(nn.Module):
    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer


class _ReferenceRoberta(nn.Module):
    """``RobertaModel(conf, identity head)``: state dict keys ``encoder.transformer.*``."""

    def __init__(self, **shape):
        super().__init__()
        self.encoder = _ReferenceEncoder(_ReferenceTransformer(**shape))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder.transformer(tokens)[:, 0]


def _randomise(module: nn.Module, std: float = 0.2) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, std)


def _tokens(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, vocab, (batch, length), generator=generator)
    tokens[:, 0] = 0
    for row in range(batch):  # different real lengths, then padding
        end = 3 + (row * 5) % (length - 3)
        tokens[row, end] = 2
        tokens[row, end + 1 :] = 1
    return tokens


def test_text_tower_has_torchtext_names_and_semantics():
    shape = dict(vocab=50, width=32, depth=2, heads=4, mlp=64, positions=40)
    reference = _ReferenceRoberta(**shape).eval()
    _randomise(reference)
    ours = create_text_encoder("text_micro", width=32, depth=2, num_heads=4, mlp_dim=64, vocab_size=50,
                               max_positions=40).eval()
    assert set(ours.state_dict()) == set(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    tokens = _tokens(4, 12, 50)
    with torch.no_grad():
        expected, got = reference(tokens), ours(tokens)
    assert got.shape == (4, 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Padding is invisible: the same text padded further gives the same feature.
    longer = torch.cat([tokens, torch.ones(4, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(longer), got, rtol=1e-5, atol=1e-5)


def test_text_blocks_are_initialised_independently():
    tower = create_text_encoder("text_micro")
    layers = tower.transformer.layers.layers
    assert not torch.equal(layers[0].linear1.weight, layers[1].linear1.weight)
    assert tower.transformer.token_embedding.weight[1].abs().sum() == 0  # the pad row


# ----------------------------------------------------------------------------- MAWS CLIP layout


def test_maws_clip_architectures_have_the_official_names_and_shapes():
    base = {k: tuple(v.shape) for k, v in build_maws_clip("vit_b16_xlmr_b", device="meta").state_dict().items()}
    prefix = "text_encoder.encoder.transformer."
    expected = {
        "logit_scale": (),
        "vision_projection": (768, 768),
        "text_projection": (768, 768),
        "vision_encoder.cls_token": (1, 1, 768),
        "vision_encoder.pos_embed": (1, 197, 768),
        "vision_encoder.blocks.11.attn.qkv.weight": (2304, 768),
        prefix + "token_embedding.weight": (250002, 768),
        prefix + "positional_embedding.embedding.weight": (514, 768),
        prefix + "embedding_layer_norm.weight": (768,),
        prefix + "layers.layers.11.self_attn.in_proj_weight": (2304, 768),
        prefix + "layers.layers.11.self_attn.in_proj_bias": (2304,),
        prefix + "layers.layers.11.self_attn.out_proj.weight": (768, 768),
        prefix + "layers.layers.11.linear1.weight": (3072, 768),
        prefix + "layers.layers.11.linear2.weight": (768, 3072),
        prefix + "layers.layers.11.norm1.bias": (768,),
        prefix + "layers.layers.11.norm2.weight": (768,),
    }
    for key, value in expected.items():
        assert base[key] == value, key
    assert not any(k.startswith(prefix + "layers.layers.12.") for k in base)
    assert not any("head" in k for k in base)  # MAWS: num_classes=0, identity text head
    large = {k: tuple(v.shape) for k, v in build_maws_clip("vit_2b14_xlmr_l", device="meta").state_dict().items()}
    assert large["vision_projection"] == (2560, 2048) and large["text_projection"] == (1024, 2048)
    assert large[prefix + "layers.layers.23.linear1.weight"] == (4096, 1024)
    assert large["vision_encoder.pos_embed"] == (1, 257, 2560)


def test_official_layout_checkpoint_loads_strictly_and_matches(tmp_path):
    """A state dict built the way MAWS builds it (timm ViT + torchtext RoBERTa + projections)."""
    from timm.models.vision_transformer import VisionTransformer

    model_file = _train_sentencepiece(tmp_path)
    vocab = build_tokenizer(model_file).vocab_size
    torch.manual_seed(1)
    vision = VisionTransformer(img_size=32, patch_size=4, embed_dim=128, depth=1, num_heads=4, mlp_ratio=4.0,
                               num_classes=0).eval()
    text = _ReferenceRoberta(vocab=vocab, width=128, depth=2, heads=2, mlp=256, positions=514).eval()
    _randomise(text, 0.05)
    state = {
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        "vision_projection": torch.randn(128, 48),
        "text_projection": torch.randn(128, 48),
        **{f"vision_encoder.{k}": v for k, v in vision.state_dict().items()},
        **{f"text_encoder.{k}": v for k, v in text.state_dict().items()},
    }
    checkpoint = tmp_path / "maws_clip_tiny.pt"
    torch.save(state, checkpoint)

    model, tokenizer, info = load_clip(checkpoint, tokenizer=model_file)
    assert info["vision_model"] == "vit_micro4" and info["image_size"] == 32
    assert model.text_encoder.shape == TextShape(128, 2, 2, 256, vocab, 514)
    tokens = tokenizer(["a red circle", "there is a small blue star in the top left"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected_text = F.normalize(text(tokens) @ state["text_projection"], dim=-1)
        expected_image = F.normalize(vision(images) @ state["vision_projection"], dim=-1)
        torch.testing.assert_close(model.encode_texts(tokens), expected_text, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_images(images), expected_image, rtol=1e-5, atol=1e-5)

    # The same state dict also fits a model built directly, strictly.
    direct = build_clip("vit_micro4", "xlmr_base", embed_dim=48, vision_depth=1,
                        text_overrides=dict(width=128, depth=2, num_heads=2, mlp_dim=256, vocab_size=vocab)).eval()
    direct.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(direct.encode_texts(tokens), expected_text, rtol=1e-5, atol=1e-5)


def test_official_file_without_tokenizer_is_a_clear_error(tmp_path):
    model = build_clip("vit_micro4", "text_micro", vision_depth=1, text_overrides={"depth": 1})
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match="tokenizer="):
        load_clip(path)


# ----------------------------------------------------------------------------- loss


def _plain_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """Row by row, with explicit log-sum-exp: the definition, not the vectorised code."""
    n = len(image)
    total = 0.0
    for i in range(n):
        image_row = [scale * float(image[i] @ text[j]) for j in range(n)]
        text_row = [scale * float(text[i] @ image[j]) for j in range(n)]
        total += math.log(sum(math.exp(v) for v in image_row)) - image_row[i]
        total += math.log(sum(math.exp(v) for v in text_row)) - text_row[i]
    return total / (2 * n)


def test_clip_loss_equals_the_plain_definition():
    image = F.normalize(torch.randn(7, 16, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(7, 16, dtype=torch.float64), dim=-1)
    got = clip_loss(image, text, torch.tensor(14.0), gather=False)
    assert abs(float(got) - _plain_clip_loss(image, text, 14.0)) < 1e-5


def test_temperature_starts_at_1_over_0_07_and_is_capped_at_100():
    model = build_clip("vit_micro4", "text_micro", vision_depth=1, text_overrides={"depth": 1})
    assert float(model.temperature().detach()) == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(8.0)
    assert float(model.temperature().detach()) == pytest.approx(100.0, rel=1e-6)
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    model.train()
    assert not model.vision_encoder.training and model.text_encoder.training


def _tiny_clip() -> CLIPModel:
    torch.manual_seed(3)
    return build_clip("vit_micro4", "text_micro", vision_depth=1, embed_dim=24,
                      text_overrides={"depth": 1, "width": 32, "num_heads": 2})


def _global_batch(size: int = 8):
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(size, 128, generator=generator)
    tokens = torch.randint(4, 260, (size, 10), generator=generator)
    tokens[:, 0] = 0
    tokens[:, -1] = 2
    tokens[::2, 6:] = 1
    return features, tokens


def _rank_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = _tiny_clip()
        ddp = DistributedDataParallel(model)
        features, tokens = _global_batch()
        shard = slice(rank * len(tokens) // world_size, (rank + 1) * len(tokens) // world_size)
        image_emb, text_emb, scale = ddp(tokens[shard], image_features=features[shard])
        loss = clip_loss(image_emb, text_emb, scale)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world_size
        if rank == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            torch.save({"loss": mean_loss, "grads": grads}, os.path.join(out_dir, "rank0.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_two_ranks_give_the_single_process_loss_and_gradients(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    distributed = torch.load(tmp_path / "rank0.pt", weights_only=True)

    model = _tiny_clip()
    features, tokens = _global_batch()
    loss = clip_loss(*model(tokens, image_features=features))
    loss.backward()
    torch.testing.assert_close(distributed["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(distributed["grads"]) and "text_projection" in grads and "logit_scale" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(distributed["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- stage


def _lit_config(tmp_path, **overrides):
    from prepretrain.stages.lit import LiTConfig

    values = dict(out_dir=str(tmp_path / "lit"), num_images=200, vision_depth=1, text_depth=1, batch_size=50,
                  steps=8, warmup_steps=1, lr=2e-3, progress=False, tensorboard=False, log_every=4,
                  ckpt_every=100)
    values.update(overrides)
    return build_config(LiTConfig, None, {k: str(v) for k, v in values.items()})


def test_lit_config_errors_name_the_key(tmp_path):
    from prepretrain.stages.lit import LiTConfig

    cases = {
        "cache_features": {"cache_features": "yes", "augment": "true"},
        "tokenizer": {"text_model": "xlmr_base"},
        "text_model": {"text_model": "gpt9"},
        "encoder": {"encoder": str(tmp_path / "missing.safetensors")},
        "max_text_tokens": {"max_text_tokens": "500"},
    }
    for key, overrides in cases.items():
        with pytest.raises(ConfigError) as error:
            build_config(LiTConfig, None, overrides)
        assert error.value.key == key


def test_cached_features_give_the_uncached_loss(tmp_path):
    from prepretrain.data.images.transforms import eval_transform
    from prepretrain.data.loader import RecordDataset
    from prepretrain.data.readers.open import open_data
    from prepretrain.stages.lit import LiTStage, caption_pairs
    from prepretrain.train.frozen import CachedInputs, compute_frozen_inputs

    stage = LiTStage(_lit_config(tmp_path))
    run = Run.of_stage(stage)
    model = stage.build_model(run)
    data = stage.train_data(run)
    assert data.frozen is not None  # the loop, not the stage, runs the locked tower over the images
    cached_set, count = compute_frozen_inputs(run, model, data.frozen, num_workers=0, max_bad_fraction=0.05)
    assert isinstance(cached_set, CachedInputs) and count == 200
    assert (tmp_path / "lit" / "feature_cache.safetensors").is_file()
    source = open_data("synthetic", split="train", image_size=32, num_images=200)
    raw = RecordDataset(source, caption_pairs(eval_transform(32, crop_fraction=1.0), stage.tokenizer))
    indices = [3, 17, 42, 99, 150, 199]
    cached = [cached_set[(i, 0)] for i in indices]
    uncached = [raw[(i, 0)] for i in indices]
    cached_batch = {k: torch.stack([item[k] for item in cached]) for k in cached[0]}
    uncached_batch = {k: torch.stack([item[k] for item in uncached]) for k in uncached[0]}
    assert torch.equal(cached_batch["tokens"], uncached_batch["tokens"])
    model.train()
    loss_cached, _ = stage.loss(model, cached_batch)
    loss_uncached, _ = stage.loss(model, uncached_batch)
    torch.testing.assert_close(loss_cached, loss_uncached, rtol=1e-6, atol=1e-6)

    again = LiTStage(_lit_config(tmp_path))  # a resumed run reads the cache back instead of recomputing
    again_run = Run.of_stage(again)
    again.build_model(again_run)
    frozen = again.train_data(again_run).frozen
    frozen.encode = None  # would fail if called
    reread, _ = compute_frozen_inputs(again_run, model, frozen, num_workers=0, max_bad_fraction=0.05)
    assert torch.equal(reread.tensors["image_features"], cached_set.tensors["image_features"])


@pytest.mark.slow
def test_lit_run_exports_a_model_that_zeroshot_reads(tmp_path):
    from prepretrain.evaluate.zeroshot import ZeroShotConfig, run_zeroshot
    from prepretrain.stages.lit import LiTStage
    from prepretrain.train.engine import train

    cfg = _lit_config(tmp_path)
    results = train(LiTStage(cfg))
    run_dir = tmp_path / "lit"
    for name in ("clip.safetensors", "encoder.safetensors", "tokenizer.json", "results.json", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "lr", "samples_per_s", "temperature"} <= set(first)
    assert results["image_tower"] == "random init" and results["features_cached"] is True
    assert 0 <= results["zeroshot_coarse_top1"] <= 100

    model, tokenizer, info = load_clip(run_dir)
    assert isinstance(tokenizer, ByteTokenizer) and info["image_size"] == 32
    zeroshot = run_zeroshot(build_config(ZeroShotConfig, None, {"model": str(run_dir), "num_images": "200"}))
    # Same classes, templates and images as the stage's own evaluation: the same number.
    assert zeroshot["top1"] == pytest.approx(results["zeroshot_coarse_top1"], abs=1e-6)
    assert (run_dir / "zeroshot" / "results.json").is_file()
    # The exported locked tower is the image tower that was trained against.
    encoder = create_vit("vit_micro4", depth=1)
    from prepretrain.models.checkpoints import load_encoder_weights

    load_encoder_weights(encoder, run_dir / "encoder.safetensors")
    torch.testing.assert_close(encoder.state_dict()["pos_embed"], model.vision_encoder.state_dict()["pos_embed"])


def test_encoder_from_a_run_directory_is_loaded_and_locked(tmp_path):
    from safetensors.torch import save_file

    from prepretrain.stages.lit import LiTStage

    torch.manual_seed(7)
    tower = create_vit("vit_micro4", depth=2)
    run = tmp_path / "wsp"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(run / "encoder.safetensors"),
              metadata={"model": "vit_micro4", "image_size": "32", "format": "timm-vit"})
    stage = LiTStage(_lit_config(tmp_path, encoder=str(run), vision_depth=0))
    model = stage.build_model(Run.of_stage(stage))
    assert len(model.vision_encoder.blocks) == 2 and stage.image_tower.endswith("encoder.safetensors")
    for key, value in tower.state_dict().items():
        assert torch.equal(model.vision_encoder.state_dict()[key], value), key
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())


def test_benchmark_reports_both_paths():
    from prepretrain.bench.steps import LiTBenchConfig, run_lit_benchmark

    cfg = build_config(LiTBenchConfig, None, {"batch_size": "8", "steps": "1", "warmup": "0", "vision_depth": "1",
                                              "device": "cpu"})
    result = run_lit_benchmark(cfg)
    assert result["uncached_steps_per_s"] > 0 and result["cached_steps_per_s"] > 0
    assert result["flops_ratio"] > 1 and result["speedup"] == pytest.approx(
        result["cached_steps_per_s"] / result["uncached_steps_per_s"], rel=0.02)


def test_text_tower_shape_inference_reads_the_weights():
    from prepretrain.models.text import infer_text_shape

    tower = TextEncoder(TextShape(128, 3, 2, 256, vocab_size=99, max_positions=60))
    assert infer_text_shape(tower.state_dict()) == TextShape(128, 3, 2, 256, 99, 60)


def _shape_aware_features(source, width: int = 128) -> torch.Tensor:
    """What a tower that recognises shapes would output: the shape (and colour) plus noise."""
    generator = torch.Generator().manual_seed(len(source))
    features = torch.randn(len(source), width, generator=generator) * 0.5
    for index in range(len(source)):
        attributes = source.attributes(index)
        features[index, attributes["shape"]] += 3.0
        features[index, 10 + attributes["colour"]] += 3.0
    return features


@pytest.mark.slow
def test_lit_learns_zero_shot_classes_from_captions_when_the_tower_sees_them(tmp_path):
    """With a frozen tower whose features separate the shapes, a short LiT run on the synthetic
    captions gives coarse zero-shot top-1 far above chance (10%): the text tower learns the
    class names and synonyms from captions alone. (The CPU demo's random tower cannot: its
    features do not separate shapes, so its zero-shot stays at chance; see the module notes.)"""
    from prepretrain.data.readers.open import open_data
    from prepretrain.stages.lit import LiTStage
    from prepretrain.train.engine import TrainData, train
    from prepretrain.train.frozen import CachedInputs

    class ShapeAwareTowerStage(LiTStage):
        def train_data(self, run) -> TrainData:
            source = open_data("synthetic", split="train", image_size=32, num_images=self.cfg.num_images)
            tokens = self.tokenizer([source.get(i).caption for i in range(len(source))])
            cached = CachedInputs({"image_features": _shape_aware_features(source), "tokens": tokens})
            return TrainData(cached, len(source))

        def validation_features(self, model, run):
            source = open_data("synthetic", split="val", image_size=32, num_images=self.cfg.num_images)
            labels = torch.tensor([source.get(i).labels["coarse"] for i in range(len(source))])
            return _shape_aware_features(source), labels

    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}\nthere is a {}\na {} on a background\n")
    cfg = _lit_config(tmp_path, num_images=1000, batch_size=128, steps=50, warmup_steps=5, lr=3e-3,
                      text_depth=2, text_width=64, text_heads=2, zeroshot_templates=str(templates))
    results = train(ShapeAwareTowerStage(cfg))
    assert results["zeroshot_coarse_top1"] > 25.0, results["zeroshot_coarse_top1"]  # 37.5 when written
    assert results["final_loss"] < math.log(128) - 0.3  # 4.30 when written; chance is log(128) = 4.85


@pytest.mark.parametrize("name,text_model,embed_dim", [
    ("vit_b16", "xlmr_base", 768), ("vit_l16", "xlmr_large", 1024),
    ("vit_h14", "xlmr_large", 1024), ("vit_2b14", "xlmr_large", 2048),
])
def test_paper_configs_resolve(tmp_path, name, text_model, embed_dim):
    from pathlib import Path

    from prepretrain.stages.lit import LiTConfig

    model_file = tmp_path / "xlmr.model"
    model_file.write_bytes(b"")  # validation only checks that the file is there
    path = Path(__file__).resolve().parents[1] / "configs" / f"lit_{name}.yaml"
    cfg = build_config(LiTConfig, path, {"encoder": "", "tokenizer": str(model_file)})
    assert (cfg.text_model, cfg.embed_dim, cfg.image_size, cfg.max_text_tokens) == (text_model, embed_dim, 224, 100)
    assert not cfg.use_cache and cfg.text_dropout == 0.1 and cfg.precision == "bf16"


@pytest.mark.parametrize("layout", ["current", "torchtext<0.13 names, fp16"])
def test_text_tower_can_start_from_a_clip_file(tmp_path, layout):
    """text_init= reads a CLIP file as zeroshot's load_clip does: old torchtext names and fp16 included."""
    from safetensors.torch import save_file

    from prepretrain.stages.lit import LiTStage
    from test_layouts import _old_torchtext_names

    source = _tiny_clip()
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if layout != "current":
        state = {k: v.half() if v.is_floating_point() else v
                 for k, v in _old_torchtext_names(state, prefix="text_encoder.").items()}
        assert any(".attention.input_projection." in k for k in state)
    path = tmp_path / "clip.safetensors"
    save_file(state, str(path))
    stage = LiTStage(_lit_config(tmp_path, text_init=str(path), text_width=32, text_heads=2, embed_dim=24))
    model = stage.build_model(Run.of_stage(stage))
    for key, value in source.text_encoder.state_dict().items():
        expected = value if layout == "current" else value.half().float()
        assert torch.equal(model.text_encoder.state_dict()[key], expected), key


@pytest.mark.parametrize("decode", ["pil", "tensor"])
def test_augmented_lit_trains_through_the_stage_decode_paths(tmp_path, decode):
    from prepretrain.stages.lit import LiTStage
    from prepretrain.train.engine import train

    results = train(LiTStage(_lit_config(tmp_path, augment="true", decode=decode, steps=2, num_images=100)))
    assert results["features_cached"] is False
    assert math.isfinite(results["final_loss"])


def test_slot_losses_sum_to_the_gradient_of_one_batch():
    """open_clip's accum-freq: each micro-batch recomputed with its graph against the others'
    graph-free embeddings; summed gradients equal the one-batch gradients, temperature included."""
    from prepretrain.models.clip import clip_loss_over_slots

    features, tokens = _global_batch(12)
    model = _tiny_clip()
    loss = clip_loss(*model(tokens, image_features=features), gather=False)
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = _tiny_clip()
    slots = [slice(0, 5), slice(5, 8), slice(8, 12)]  # unequal micro-batches (a skipped sample)
    with torch.no_grad():
        embedded = [model(tokens[s], image_features=features[s]) for s in slots]
    for live, part in enumerate(slots):
        out = [*embedded[:live], model(tokens[part], image_features=features[part]), *embedded[live + 1:]]
        slot_loss = clip_loss_over_slots([e[0] for e in out], [e[1] for e in out], out[live][2], live, gather=False)
        torch.testing.assert_close(slot_loss, loss.detach(), rtol=1e-6, atol=1e-6)
        slot_loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(expected) and "logit_scale" in got
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_accumulated_lit_steps_equal_one_global_batch(tmp_path):
    """batch_size 32 from micro-batches of 8 (4 accumulated) trains exactly as one batch of 32:
    the same losses at every step and the same weights at the end."""
    from safetensors.torch import load_file

    from prepretrain.stages.lit import LiTStage
    from prepretrain.train.engine import train

    runs = {}
    for micro in (32, 8):
        out = tmp_path / f"micro{micro}"
        cfg = _lit_config(tmp_path, out_dir=str(out), batch_size=32, micro_batch_size=micro, steps=3, log_every=1,
                          lr=2e-3, warmup_steps=0, clip_grad=1e6)  # clip_grad logs the gradient norm
        train(LiTStage(cfg))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[micro] = ([row["loss"] for row in rows if "loss" in row],
                       [row["grad_norm"] for row in rows if "grad_norm" in row],
                       load_file(str(out / "clip.safetensors")))
    assert len(runs[32][0]) == 3 and len(runs[32][1]) == 3
    assert runs[8][0] == pytest.approx(runs[32][0], rel=1e-5)
    assert runs[8][1] == pytest.approx(runs[32][1], rel=1e-4)
    for name, tensor in runs[32][2].items():  # within 1% of one step's lr: summation order only
        torch.testing.assert_close(runs[8][2][name], tensor, rtol=0, atol=2e-5, msg=name)
