"""open_clip model folders: prepretrain's LiT / MAWS-CLIP models written for open_clip, and read back.

Why: the people who evaluate zero-shot models load them with open_clip
(``open_clip.create_model_and_transforms("local-dir:FOLDER")``) and score them with
CLIP_benchmark. A folder written here is what open_clip (>= 3.0) reads from a local directory:

``open_clip_config.json``       ``model_cfg`` (the towers), ``preprocess_cfg`` (the eval transform),
                                and a ``prepretrain`` block that open_clip ignores and we read back
``open_clip_model.safetensors`` the weights, in the state-dict names of open_clip's
                                ``CustomTextCLIP`` (``visual.trunk.*``, ``visual.head.proj.weight``,
                                ``text.transformer.*``, ``text.proj.weight``, ``logit_scale``)
``hf_text/config.json``         the Hugging Face ``XLMRobertaConfig`` of the text tower
``timm_tower/config.json``      timm's hub config of the image tower, when no registered timm name has
                                its exact shape (tiny and 2B towers, other resolutions)
tokenizer files                 ``sentencepiece.bpe.model`` + ``tokenizer_config.json``
                                (``XLMRobertaTokenizer``) for the XLM-R SentencePiece tokenizer;
                                ``tokenizer.json`` + ``tokenizer_config.json`` for the byte tokenizer

The towers, with open_clip's own classes (open_clip ``model.py``, ``timm_model.py``, ``hf_model.py``):

* image: ``TimmModel`` (``timm_model_name``, ``timm_pool="token"``, ``timm_proj="linear"`` without
  bias). Its trunk is the timm ``VisionTransformer`` prepretrain already uses, key for key; the
  projection ``x @ vision_projection`` is ``Linear(width, embed, bias=False)`` with the transposed
  matrix. ``TimmModel`` calls ``timm.create_model(timm_model_name)`` with no shape arguments, so the
  name must give the exact shape: ViT-B/16, L/16 and H/14 at 224 px are timm's registered
  ``vit_{base,large,huge}_patch*_224``; any other shape is named ``local-dir:<folder>/timm_tower``
  (timm >= 1.0.20 reads its ``config.json``, architecture + ``model_args``).
* text: ``HFTextEncoder`` over transformers' ``XLMRobertaModel`` (``hf_pooler_type=
  "cls_last_hidden_state_pooler"``, ``hf_proj_type="linear"``). prepretrain's tower is torchtext's
  RoBERTa (see :mod:`prepretrain.models.text`) and computes the same function as Hugging Face's
  RoBERTa: fairseq positions offset by the padding index, embedding LayerNorm, post-norm blocks
  with exact GELU and eps 1e-5, attention masked at pad keys, feature = token 0. Renaming is
  exact apart from two things: torchtext packs q;k;v into one ``in_proj`` (split into
  ``query``/``key``/``value``, rows in that order) and Hugging Face adds a token-type embedding
  (one row, written as zeros, so adding it changes nothing). This holds for XLM-R Base/Large
  (MAWS-CLIP) and for prepretrain's small towers alike. ``open_clip``'s own ``TextTransformer``
  is pre-norm with a causal mask and cannot express these towers.

The catch of loading from a local folder: open_clip's config names the text tower's Hugging Face
config and a non-registered timm tower by *path* (``AutoConfig.from_pretrained(hf_model_name)``,
``timm.create_model("local-dir:...")``), and a relative path would be read against the working
directory, so the folder records absolute paths: after moving it, convert again. For a model hub
(``hub_repo="ORG/NAME"``) the text config is the folder's root ``config.json`` and the config names
the repository instead; the image tower then needs a registered timm name.

Tokenizers: open_clip's ``get_tokenizer("local-dir:FOLDER")`` builds its ``HFTokenizer`` from the
folder. Both give the ids of :mod:`prepretrain.models.tokenizers` (BOS 0, pad 1, EOS 2, the
same truncation and padding). They differ before tokenizing: open_clip cleans every text
(``ftfy.fix_text``, HTML unescaping, runs of whitespace collapsed, ends stripped); prepretrain
tokenizes the text as given. Prompts from templates are unchanged by that cleaning; captions with
double spaces, leading spaces or HTML entities get other ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..files import save_safetensors, write_json, write_text
from .layouts import CheckpointMismatch
from .text import TextShape
from .tokenizers import BOS_ID, EOS_ID, NUM_SPECIALS, PAD_ID, UNK_ID, Tokenizer

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
HF_TEXT_DIR = "hf_text"
TIMM_TOWER_DIR = "timm_tower"
SENTENCEPIECE_FILE = "sentencepiece.bpe.model"  # the name XLMRobertaTokenizer looks for
TOKENIZER_JSON, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
TEXT_POOLER = "cls_last_hidden_state_pooler"

_TEXT = "text_encoder.encoder.transformer."
_HF = "text.transformer."
# prepretrain (torchtext) text-tower names -> Hugging Face RoBERTa names, per block and outside blocks.
_TEXT_TOP = {
    "token_embedding.weight": "embeddings.word_embeddings.weight",
    "positional_embedding.embedding.weight": "embeddings.position_embeddings.weight",
    "embedding_layer_norm.weight": "embeddings.LayerNorm.weight",
    "embedding_layer_norm.bias": "embeddings.LayerNorm.bias",
}
_TEXT_BLOCK = {
    "self_attn.out_proj.weight": "attention.output.dense.weight",
    "self_attn.out_proj.bias": "attention.output.dense.bias",
    "norm1.weight": "attention.output.LayerNorm.weight",
    "norm1.bias": "attention.output.LayerNorm.bias",
    "linear1.weight": "intermediate.dense.weight",
    "linear1.bias": "intermediate.dense.bias",
    "linear2.weight": "output.dense.weight",
    "linear2.bias": "output.dense.bias",
    "norm2.weight": "output.LayerNorm.weight",
    "norm2.bias": "output.LayerNorm.bias",
}
_QKV = ("query", "key", "value")
_TOKEN_TYPE = "embeddings.token_type_embeddings.weight"


# ------------------------------------------------------------------------------ weights


def to_open_clip_state(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """A MAWS-CLIP-layout state dict (``vision_encoder.*``, ``text_encoder.*``, projections,
    ``logit_scale``) in open_clip's ``CustomTextCLIP`` names (timm trunk + Hugging Face RoBERTa)."""
    out: dict[str, torch.Tensor] = {"logit_scale": state["logit_scale"]}
    for key, value in state.items():
        if key.startswith("vision_encoder."):
            out["visual.trunk." + key[len("vision_encoder."):]] = value
    out["visual.head.proj.weight"] = state["vision_projection"].t().contiguous()
    out["text.proj.weight"] = state["text_projection"].t().contiguous()
    for ours, theirs in _TEXT_TOP.items():
        out[_HF + theirs] = state[_TEXT + ours]
    width = state[_TEXT + "token_embedding.weight"].shape[1]
    out[_HF + _TOKEN_TYPE] = torch.zeros(1, width, dtype=state[_TEXT + "token_embedding.weight"].dtype)
    for i in range(depth):
        ours, theirs = f"{_TEXT}layers.layers.{i}.", f"{_HF}encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for name, part in zip(_QKV, state[f"{ours}self_attn.in_proj_{kind}"].chunk(3, dim=0)):
                out[f"{theirs}attention.self.{name}.{kind}"] = part.contiguous()
        for a, b in _TEXT_BLOCK.items():
            out[theirs + b] = state[ours + a]
    return out


def from_open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_open_clip_state`: open_clip names back to the MAWS-CLIP layout,
    every tensor unchanged (q, k, v concatenated back into ``in_proj``). A token-type embedding
    that is not all zeros (a tower trained with one) has no place in the torchtext tower: refused."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    missing = [k for k in ("logit_scale", "visual.head.proj.weight", "text.proj.weight") if k not in state]
    if missing or not any(k.startswith(_HF + "encoder.layer.") for k in state):
        extra = " (an open_clip model with its own text transformer: prepretrain's CLIP model has a RoBERTa " \
                "text tower only)" if "token_embedding.weight" in state or "text.token_embedding.weight" in state \
            else ""
        raise CheckpointMismatch(f"not an open_clip model with a timm image tower and a Hugging Face RoBERTa text "
                                 f"tower{extra}; missing {missing or ['text.transformer.encoder.layer.*']}")
    token_type = state.get(_HF + _TOKEN_TYPE)
    if token_type is not None and (token_type.shape[0] != 1 or token_type.count_nonzero()):
        raise CheckpointMismatch(f"{_HF + _TOKEN_TYPE} is not one row of zeros: the text tower uses token "
                                 "types, which prepretrain's RoBERTa tower has no place for")
    out: dict[str, torch.Tensor] = {}
    taken = {"logit_scale", "visual.head.proj.weight", "text.proj.weight", _HF + _TOKEN_TYPE}
    for key, value in state.items():
        if key.startswith("visual.trunk."):
            out["vision_encoder." + key[len("visual.trunk."):]] = value
            taken.add(key)
    out["logit_scale"] = state["logit_scale"].reshape(())
    out["vision_projection"] = state["visual.head.proj.weight"].t().contiguous()
    out["text_projection"] = state["text.proj.weight"].t().contiguous()
    for ours, theirs in _TEXT_TOP.items():
        out[_TEXT + ours] = state[_HF + theirs]
        taken.add(_HF + theirs)
    depth = 1 + max(int(k[len(_HF + "encoder.layer."):].split(".")[0]) for k in state
                    if k.startswith(_HF + "encoder.layer."))
    for i in range(depth):
        ours, theirs = f"{_TEXT}layers.layers.{i}.", f"{_HF}encoder.layer.{i}."
        for kind in ("weight", "bias"):
            parts = [f"{theirs}attention.self.{name}.{kind}" for name in _QKV]
            out[f"{ours}self_attn.in_proj_{kind}"] = torch.cat([state[p] for p in parts], dim=0)
            taken.update(parts)
        for a, b in _TEXT_BLOCK.items():
            out[ours + a] = state[theirs + b]
            taken.add(theirs + b)
    left = sorted(set(state) - taken - {_HF + "embeddings.position_ids"})
    if left:
        raise CheckpointMismatch(f"open_clip tensors with no place in prepretrain's CLIP model: {', '.join(left[:8])}")
    return out


# ------------------------------------------------------------------------------ configs


def hf_text_config(shape: TextShape) -> dict[str, Any]:
    """transformers' ``XLMRobertaConfig`` of a prepretrain text tower (dropout 0: an inference export)."""
    return {
        "architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta", "vocab_size": shape.vocab_size,
        "hidden_size": shape.width, "num_hidden_layers": shape.depth, "num_attention_heads": shape.num_heads,
        "intermediate_size": shape.mlp_dim, "hidden_act": "gelu", "max_position_embeddings": shape.max_positions,
        "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": shape.padding_idx, "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID, "position_embedding_type": "absolute", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
    }


def text_shape_from_hf(config: dict[str, Any], origin: str) -> TextShape:
    """The :class:`TextShape` of a Hugging Face RoBERTa config, refusing what the torchtext tower cannot be."""
    if config.get("model_type") not in ("xlm-roberta", "roberta"):
        raise CheckpointMismatch(f"{origin}: model_type {config.get('model_type')!r} is not a RoBERTa/XLM-R text "
                                 "tower (the only text tower prepretrain's CLIP model has)")
    rules = {"hidden_act": "gelu", "position_embedding_type": "absolute"}
    wrong = {k: config.get(k) for k, v in rules.items() if config.get(k, v) != v}
    if abs(float(config.get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
        wrong["layer_norm_eps"] = config.get("layer_norm_eps")
    if wrong:
        raise CheckpointMismatch(f"{origin}: {wrong} differ from the RoBERTa tower prepretrain runs "
                                 f"(needs {rules} and layer_norm_eps 1e-5)")
    try:
        return TextShape(int(config["hidden_size"]), int(config["num_hidden_layers"]),
                         int(config["num_attention_heads"]), int(config["intermediate_size"]),
                         int(config["vocab_size"]), int(config["max_position_embeddings"]),
                         int(config.get("pad_token_id", PAD_ID)))
    except KeyError as error:
        raise CheckpointMismatch(f"{origin}: no {error.args[0]} in the text tower's config") from None


def open_clip_config(embed_dim: int, image_size: int, timm_model_name: str, hf_model_name: str,
                     context_length: int, vocab_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                     prepretrain: dict[str, str]) -> dict[str, Any]:
    """The whole ``open_clip_config.json``: open_clip's ``model_cfg`` and ``preprocess_cfg``, and the
    metadata prepretrain needs to rebuild the model exactly (``prepretrain``; open_clip ignores it)."""
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {"image_size": image_size, "timm_model_name": timm_model_name,
                           "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": "linear",
                           "timm_proj_bias": False},
            "text_cfg": {"hf_model_name": hf_model_name, "hf_tokenizer_name": hf_model_name,
                         "hf_model_pretrained": False, "hf_proj_type": "linear", "hf_pooler_type": TEXT_POOLER,
                         "context_length": context_length, "vocab_size": vocab_size},
        },
        # open_clip's eval transform: resize the shorter side (bicubic), center crop, normalise; the
        # transform `prepretrain zeroshot` applies (crop fraction 1.0)
        "preprocess_cfg": {"size": image_size, "mean": list(mean), "std": list(std), "interpolation": "bicubic",
                           "resize_mode": "shortest"},
        "prepretrain": prepretrain,
    }


# ------------------------------------------------------------------------------ tokenizers


def write_tokenizer_files(tokenizer: Tokenizer, out: Path) -> None:
    """The files open_clip's ``HFTokenizer`` (transformers' ``AutoTokenizer``) reads from the folder,
    giving the ids prepretrain's tokenizer gives: XLM-R's SentencePiece model (transformers'
    ``XLMRobertaTokenizer`` applies the same fairseq id shift), or the byte tokenizer written as a
    ``tokenizers`` byte-level model without merges (id = 4 + byte, ``<s> ... </s>``)."""
    config = {"model_max_length": tokenizer.context_length, "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "unk_token": "<unk>", "padding_side": "right", "truncation_side": "right"}
    if tokenizer.kind == "sentencepiece":
        tokenizer.copy_model_to(out, SENTENCEPIECE_FILE)
        write_json(out / TOKENIZER_CONFIG, {"tokenizer_class": "XLMRobertaTokenizer", **config})
        return
    if tokenizer.kind != "bytes":
        raise CheckpointMismatch(f"no open_clip tokenizer for prepretrain tokenizer kind {tokenizer.kind!r}")
    write_text(out / TOKENIZER_JSON, json.dumps(byte_tokenizer_json(), ensure_ascii=False) + "\n")
    # split_special_tokens: the text "<s>" is five bytes, as for prepretrain's byte tokenizer
    write_json(out / TOKENIZER_CONFIG, {"tokenizer_class": "PreTrainedTokenizerFast", "split_special_tokens": True,
                                        **config})


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what a byte-level ``tokenizers`` model sees)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer_json() -> dict[str, Any]:
    """prepretrain's :class:`~prepretrain.models.tokenizers.ByteTokenizer` as a ``tokenizers`` file:
    byte-level pre-tokenizer (no regex split, no prefix space), a BPE model whose vocabulary is the
    four specials and the 256 bytes at 4 + byte and that has no merges, ``<s> $A </s>`` framing."""
    specials = {"<s>": BOS_ID, "<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
    vocab = dict(specials)
    vocab.update({char: NUM_SPECIALS + byte for byte, char in _bytes_to_unicode().items()})
    added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for name, i in specials.items()]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "</s>", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}},
                     {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS_ID], "tokens": ["<s>"]},
                               "</s>": {"id": "</s>", "ids": [EOS_ID], "tokens": ["</s>"]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


# ------------------------------------------------------------------------------ writing and reading


def check_hub_tower(timm_model_name: str, hub_repo: str, what: str) -> None:
    """A hub folder can only name a registered timm tower (open_clip passes timm nothing but the name)."""
    if hub_repo and not timm_model_name:
        raise CheckpointMismatch(f"--hub-repo: the image tower ({what}) has no registered timm name with its exact "
                                 "shape, and open_clip gives timm only a name: on a hub it cannot be described; "
                                 "convert without --hub-repo for a local folder")


def write_open_clip_folder(out: str | Path, state: dict[str, torch.Tensor], text_shape: TextShape,
                           tokenizer: Tokenizer, *, embed_dim: int, image_size: int, timm_model_name: str,
                           timm_tower_config: dict[str, Any] | None, mean: tuple[float, ...],
                           std: tuple[float, ...], prepretrain: dict[str, str], hub_repo: str = "") -> Path:
    """Write the folder (see the module docstring) for a MAWS-CLIP-layout ``state``.

    ``timm_model_name`` "" = the image tower is described by ``timm_tower_config`` (timm's hub
    ``config.json``) in ``out/timm_tower`` and named ``local-dir:`` that folder. ``hub_repo``
    (``ORG/NAME``): the folder is for that model-hub repository, loaded with ``hf-hub:ORG/NAME``: the
    text config is its root ``config.json`` and the config names the repository, not local paths.
    """
    out = Path(out).resolve()
    if out.suffix in (".safetensors", ".pt", ".pth", ".bin", ".json"):
        raise CheckpointMismatch(f"--to open_clip writes a folder; {out} looks like a file")
    if out.is_file():
        raise CheckpointMismatch(f"{out} is a file; --to open_clip writes a folder")
    check_hub_tower(timm_model_name, hub_repo, str(prepretrain.get("vision_model", "")))
    if not timm_model_name:
        if timm_tower_config is None:
            raise ValueError("timm_tower_config is needed when timm_model_name is empty")
        write_json(out / TIMM_TOWER_DIR / "config.json", timm_tower_config)
        timm_model_name = f"local-dir:{out / TIMM_TOWER_DIR}"
    text_config_dir = out if hub_repo else out / HF_TEXT_DIR
    write_json(text_config_dir / "config.json", hf_text_config(text_shape))
    write_tokenizer_files(tokenizer, out)
    config = open_clip_config(embed_dim, image_size, timm_model_name, hub_repo or str(text_config_dir),
                              tokenizer.context_length, text_shape.vocab_size, mean, std, prepretrain)
    save_safetensors(out / OPEN_CLIP_WEIGHTS, to_open_clip_state(state, text_shape.depth))
    write_json(out / OPEN_CLIP_CONFIG, config)
    return out


def is_open_clip_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / OPEN_CLIP_CONFIG).is_file()


def looks_like_open_clip_state(keys: list[str]) -> bool:
    """open_clip's names (``visual.*`` and ``text.*`` or a top-level text transformer), maybe under ``module.``."""
    keys = [k[len("module."):] if k.startswith("module.") else k for k in keys]
    return any(k.startswith("visual.") for k in keys) and any(
        k.startswith("text.") or k.startswith("token_embedding.") for k in keys)


def read_open_clip_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointMismatch(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise CheckpointMismatch(f"{path}: no model_cfg (not an open_clip model config)")
    return config


def locate_open_clip(spec: str | Path, config: str | Path = "") -> tuple[Path, Path]:
    """(weights file, ``open_clip_config.json``) of an open_clip folder, or of an open_clip checkpoint
    file whose config is named (``config``) or lies beside it (open_clip's name for it)."""
    path = Path(spec)
    if config and not Path(config).is_file():
        raise FileNotFoundError(f"open_clip config not found: {config}")
    if path.is_dir():
        config_path = Path(config) if config else path / OPEN_CLIP_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"{path}: not an open_clip folder (no {OPEN_CLIP_CONFIG})")
        names = [OPEN_CLIP_WEIGHTS, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                 "open_clip_model.bin", "model.safetensors", "pytorch_model.bin"]
        weights = next((path / n for n in names if (path / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{path}: an open_clip folder without weights (looked for {', '.join(names)})")
        return weights, config_path
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: no such open_clip folder or checkpoint file")
    config_path = Path(config) if config else path.parent / OPEN_CLIP_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has open_clip weights but no {OPEN_CLIP_CONFIG} beside it: name the config "
                                "of its model (zeroshot open_clip_config=FILE, lit text_init_config=FILE) or put "
                                "it beside the file")
    return path, config_path


def open_clip_metadata(config: dict[str, Any], state: dict[str, torch.Tensor], folder: Path,
                       config_path: Path) -> dict[str, Any]:
    """What prepretrain needs besides the weights: text shape, image size, tokenizer, and the folder
    (``base_dir``, the config's) that a relative tokenizer file is found in.

    Our own folders carry it in the ``prepretrain`` block; for others it is read from open_clip's
    config, the Hugging Face config it names, and the tokenizer files in the folder.
    """
    model_cfg = config["model_cfg"]
    text_cfg, vision_cfg = model_cfg.get("text_cfg") or {}, model_cfg.get("vision_cfg") or {}
    ours = config.get("prepretrain") or {}
    if ours.get("text_shape") and ours.get("tokenizer"):
        return {"text_shape": TextShape(**json.loads(ours["text_shape"])), "image_size": int(ours["image_size"]),
                "vision_model": ours.get("vision_model", ""), "tokenizer": json.loads(ours["tokenizer"]),
                "base_dir": folder}
    if not text_cfg.get("hf_model_name"):
        raise CheckpointMismatch(f"{config_path}: text_cfg has no hf_model_name: the model's text tower is "
                                 "open_clip's own transformer, not the RoBERTa tower prepretrain's CLIP model has")
    for key, want in (("timm_pool", "token"), ("timm_proj", "linear"), ("hf_pooler_type", TEXT_POOLER),
                      ("hf_proj_type", "linear")):
        cfg = vision_cfg if key.startswith("timm") else text_cfg
        if cfg.get(key) != want:
            raise CheckpointMismatch(f"{config_path}: {key} is {cfg.get(key)!r}; prepretrain's CLIP model needs "
                                     f"{want!r}")
    if vision_cfg.get("timm_proj_bias"):
        raise CheckpointMismatch(f"{config_path}: timm_proj_bias is true; prepretrain's projections have no bias")
    hf_name = Path(text_cfg["hf_model_name"])
    hf_config = hf_name / "config.json" if hf_name.is_dir() else hf_name
    if not hf_config.is_file():
        raise FileNotFoundError(f"{config_path}: text_cfg.hf_model_name {text_cfg['hf_model_name']!r} is not a "
                                "local folder with a config.json (nothing is downloaded)")
    shape = text_shape_from_hf(json.loads(hf_config.read_text(encoding="utf-8")), str(hf_config))
    context = int(text_cfg.get("context_length", 0))
    if (folder / SENTENCEPIECE_FILE).is_file():
        tokenizer = {"kind": "sentencepiece", "model_file": str(folder / SENTENCEPIECE_FILE),
                     "max_tokens": max(context - 2, 1)}
    else:
        raise FileNotFoundError(f"{folder}: no {SENTENCEPIECE_FILE} (the XLM-R tokenizer) and no prepretrain block "
                                f"in {OPEN_CLIP_CONFIG} naming the tokenizer")
    image_size = vision_cfg.get("image_size", 224)
    image_size = int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size)
    return {"text_shape": shape, "image_size": image_size, "vision_model": "", "tokenizer": tokenizer,
            "base_dir": folder}


def read_open_clip(spec: str | Path, read_state, config: str | Path = "",
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """(MAWS-CLIP-layout state dict, metadata of :func:`open_clip_metadata`, weights path) of an
    open_clip folder or checkpoint file (``config``: its ``open_clip_config.json`` when not beside it).
    ``read_state`` reads a weights file (safetensors or a weights-only pickle; open_clip's training
    checkpoints keep theirs under ``state_dict``)."""
    weights, config_path = locate_open_clip(spec, config)
    config = read_open_clip_config(config_path)
    state = from_open_clip_state(read_state(weights))
    return state, open_clip_metadata(config, state, config_path.parent, config_path), weights



# ------------------------------------------------------------------------------ OpenAI-layout CLIP files

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation (open_clip constants.py)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_OPENAI_BLOCK = {
    "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias",
    "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight", "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_OPENAI_TOP = {"visual.conv1.weight": "patch_embed.proj.weight", "visual.ln_pre.weight": "norm_pre.weight",
               "visual.ln_pre.bias": "norm_pre.bias", "visual.ln_post.weight": "norm.weight",
               "visual.ln_post.bias": "norm.bias"}
# timm's registered CLIP image towers: (patch, width, depth, image size) -> name without the activation suffix
_TIMM_CLIP_NAMES = {(32, 768, 12, 224): "vit_base_patch32_clip", (16, 768, 12, 224): "vit_base_patch16_clip",
                    (14, 1024, 24, 224): "vit_large_patch14_clip", (14, 1024, 24, 336): "vit_large_patch14_clip"}


def is_openai_clip_state(keys: list[str]) -> bool:
    """OpenAI's CLIP layout (its ``clip`` package, and open_clip's own ``CLIP`` class): a ViT image tower
    under ``visual.`` with ``conv1``/``class_embedding``, the text transformer at the top level."""
    keys = set(keys)
    return {"visual.conv1.weight", "visual.class_embedding", "token_embedding.weight", "text_projection"} <= keys


def openai_clip_shapes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The shapes an OpenAI-layout file fixes (heads are width / 64, as in every OpenAI and open_clip ViT)."""
    if "visual.proj" not in state or "visual.transformer.resblocks.0.attn.in_proj_weight" not in state:
        raise CheckpointMismatch("an OpenAI-layout CLIP file with a ViT image tower is needed (visual.proj, "
                                 "visual.transformer.resblocks.*); ResNet towers are not converted")
    width = int(state["visual.conv1.weight"].shape[0])
    patch = int(state["visual.conv1.weight"].shape[-1])
    tokens = int(state["visual.positional_embedding"].shape[0]) - 1
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise CheckpointMismatch(f"visual.positional_embedding has {tokens} patch positions: not a square grid")

    def depth(prefix: str) -> int:
        return 1 + max(int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix))

    text_width = int(state["token_embedding.weight"].shape[1])
    return {"width": width, "patch": patch, "image_size": side * patch, "depth": depth("visual.transformer.resblocks."),
            "mlp": int(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "embed_dim": int(state["text_projection"].shape[1]), "text_width": text_width,
            "text_depth": depth("transformer.resblocks."),
            "context_length": int(state["positional_embedding"].shape[0]),
            "vocab_size": int(state["token_embedding.weight"].shape[0])}


def openai_to_open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenAI-layout CLIP state dict with its image tower in timm's CLIP-ViT names under
    ``visual.trunk.`` (open_clip's ``TimmModel``), the projection as ``visual.head.proj.weight``; the text
    tower keeps its names (open_clip's ``CLIP`` class uses OpenAI's). Tensors unchanged, apart from the
    class token and position embedding gaining their batch axis and the projection transposed."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in ("input_resolution", "context_length", "vocab_size"):  # scalars in OpenAI's TorchScript files
            continue
        if not key.startswith("visual."):
            out[key] = value
        elif key in _OPENAI_TOP:
            out["visual.trunk." + _OPENAI_TOP[key]] = value
        elif key == "visual.class_embedding":
            out["visual.trunk.cls_token"] = value.reshape(1, 1, -1)
        elif key == "visual.positional_embedding":
            out["visual.trunk.pos_embed"] = value.unsqueeze(0)
        elif key == "visual.proj":
            out["visual.head.proj.weight"] = value.t().contiguous()
        elif key.startswith("visual.transformer.resblocks."):
            index, leaf = key[len("visual.transformer.resblocks."):].split(".", 1)
            if leaf not in _OPENAI_BLOCK:
                raise CheckpointMismatch(f"{key}: no counterpart in timm's CLIP ViT block")
            out[f"visual.trunk.blocks.{index}.{_OPENAI_BLOCK[leaf]}"] = value
        else:
            raise CheckpointMismatch(f"{key}: no counterpart in timm's CLIP ViT")
    return out


def openai_timm_tower(shapes: dict[str, int], quick_gelu: bool) -> tuple[str, dict[str, Any] | None]:
    """(registered timm name, None) when timm has the exact tower, else ("", timm hub config.json)."""
    suffix = "_quickgelu" if quick_gelu else ""
    key = (shapes["patch"], shapes["width"], shapes["depth"], shapes["image_size"])
    if key in _TIMM_CLIP_NAMES and shapes["mlp"] == 4 * shapes["width"]:
        return f"{_TIMM_CLIP_NAMES[key]}{suffix}_{shapes['image_size']}", None
    model_args = {"img_size": shapes["image_size"], "patch_size": shapes["patch"], "embed_dim": shapes["width"],
                  "depth": shapes["depth"], "num_heads": max(1, shapes["width"] // 64),
                  "mlp_ratio": shapes["mlp"] / shapes["width"], "class_token": True, "global_pool": "token",
                  "num_classes": 0}
    architecture = f"vit_base_patch16_clip{suffix}_224"  # pre-norm, LayerNorm eps 1e-5, no patch bias
    return "", {"architecture": architecture, "num_classes": 0, "num_features": shapes["width"],
                "global_pool": "token", "model_args": model_args,
                "pretrained_cfg": {"input_size": [3, shapes["image_size"], shapes["image_size"]],
                                   "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
                                   "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "num_classes": 0,
                                   "first_conv": "patch_embed.proj", "classifier": "head"}}


def write_openai_clip_folder(out: str | Path, state: dict[str, torch.Tensor], quick_gelu: bool = True,
                             hub_repo: str = "") -> Path:
    """The open_clip folder of an OpenAI-layout CLIP file: a timm image tower (``timm_model_name``),
    open_clip's own text transformer and its own tokenizer (``SimpleTokenizer``: the BPE vocabulary
    ships inside open_clip, so the folder holds no tokenizer file). OpenAI's released models use
    QuickGELU (``quick_gelu``); a file trained with exact GELU in this layout needs ``quick_gelu=False``
    (the weights do not say which). ``hub_repo``: as for :func:`write_open_clip_folder` (nothing
    else in this folder names a local path)."""
    out = Path(out).resolve()
    if out.suffix in (".safetensors", ".pt", ".pth", ".bin", ".json") or out.is_file():
        raise CheckpointMismatch(f"--to open_clip writes a folder; {out} looks like a file")
    shapes = openai_clip_shapes(state)
    timm_name, tower = openai_timm_tower(shapes, quick_gelu)
    check_hub_tower(timm_name, hub_repo, f"ViT patch {shapes['patch']}, width {shapes['width']}")
    if not timm_name:
        write_json(out / TIMM_TOWER_DIR / "config.json", tower)
        timm_name = f"local-dir:{out / TIMM_TOWER_DIR}"
    config = {
        "model_cfg": {
            "embed_dim": shapes["embed_dim"], "quick_gelu": quick_gelu,
            "vision_cfg": {"image_size": shapes["image_size"], "timm_model_name": timm_name,
                           "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": "linear",
                           "timm_proj_bias": False},
            "text_cfg": {"context_length": shapes["context_length"], "vocab_size": shapes["vocab_size"],
                         "width": shapes["text_width"], "heads": max(1, shapes["text_width"] // 64),
                         "layers": shapes["text_depth"]},
        },
        "preprocess_cfg": {"size": shapes["image_size"], "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    save_safetensors(out / OPEN_CLIP_WEIGHTS, openai_to_open_clip_state(state))
    write_json(out / OPEN_CLIP_CONFIG, config)
    return out
