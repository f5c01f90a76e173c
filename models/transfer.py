"""Initialise a DiT / SiT / ViT from a USP (or MAE) pretraining checkpoint (USP's `--finetune`).

What moves where:
  MAE / USP encoder                     DiT, SiT (-VAE-simple)            ViT classifier
  cls_token (1, 1, D)                   - (no cls token)                  cls_token
  pos_embed (1, 1 + g*g, D)             pos_embed (1, G*G, D)             pos_embed (1, 1 + G*G, D)
  patch_embed.proj                      x_embedder.proj (if shapes fit)   patch_embed.proj
  blocks.i.{norm1,attn,norm2,mlp}       blocks.i.* (first N with          blocks.i.*
                                        use_pretrain_layer=N)
  norm                                  - (final layer is adaLN)          norm (cls-token head) | - (global pool)
  decoder_*, mask_token                 -                                 -
LightningDiT (a DiT) takes the same mapping from a USP encoder built of LightningDiT blocks
(`models.mae.MaskedAutoencoderLightningDiT`): blocks.i.{norm1,attn,norm2,mlp.w12,mlp.w3} load one for one. A checkpoint
whose blocks are of another family (a ViT encoder's GELU MLP and LayerNorm biases) is refused for
LightningDiT rather than half-loaded. Fixed tables the model builds itself (LightningDiT's RoPE
`feat_rope.*` buffers) are listed in a note, not as newly initialised weights.
Position embeddings are resized bicubically when the grids differ (pretraining at 224 px gives a
14x14 grid, DiT at 256 px needs 16x16). Everything the checkpoint does not provide keeps the
model's own initialisation (DiT's adaLN-Zero, the classifier head, fc_norm).

Loading is non-strict but verified: a name present on both sides with an unexpected shape (another
width, another MLP ratio) is a `UserError`, as is a checkpoint that provides nothing at all.
"""
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.lightningdit_layers import LightningEncoderBlock
from util.checkpoint import load_checkpoint
from util.errors import UserError

logger = logging.getLogger(__name__)

# Why a checkpoint entry is not used, by name pattern (first match wins).
_IGNORE_REASONS = (
    (re.compile(r"^(decoder_|mask_token)"), "MAE decoder, only used for pretraining"),
    (re.compile(r"^cls_token$"), "the model has no cls token"),
    (re.compile(r"^norm\."), "final encoder norm has no counterpart in the model"),
)
# Tensors that may legitimately differ in shape: the input embedding (channels / patch size) and the
# classifier head (class count). They are skipped with a reason instead of failing the transfer.
_PATCH_EMBEDDINGS = ("patch_embed.proj.", "x_embedder.proj.")
_HEADS = ("head.",)
# Usual widths of the ViT/DiT size names, for the width-mismatch hint.
_SIZE_OF_WIDTH = {384: "S", 768: "B", 1024: "L", 1152: "XL", 1280: "H"}




@dataclass
class TransferReport:
    """What `transfer_pretrained` did, by parameter name of the model (loaded, initialised, resized)
    or of the checkpoint (ignored)."""

    source: str
    target: str
    loaded: List[str] = field(default_factory=list)
    initialised: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    resized: Dict[str, Tuple[tuple, tuple]] = field(default_factory=dict)
    renamed: Dict[str, str] = field(default_factory=dict)  # checkpoint name -> model name
    reasons: Dict[str, str] = field(default_factory=dict)  # ignored checkpoint name -> why
    notes: List[str] = field(default_factory=list)
    loaded_numel: int = 0
    total_numel: int = 0

    def __str__(self) -> str:
        lines = [
            f"transfer {self.source} -> {self.target}: {len(self.loaded)} tensors loaded "
            f"({self.loaded_numel / 1e6:.2f}M of {self.total_numel / 1e6:.2f}M parameters), "
            f"{len(self.initialised)} newly initialised, {len(self.ignored)} ignored, {len(self.resized)} resized"
        ]
        renamed_to = {new: old for old, new in self.renamed.items()}

        def loaded_detail(name):
            details = []
            if name in renamed_to:
                details.append(f"from {renamed_to[name].rsplit('.', 1)[0]}")
            if name in self.resized:
                old, new = self.resized[name]
                details.append(f"resized {old} -> {new}")
            return details

        sections = (
            ("loaded", self.loaded, loaded_detail),
            ("newly initialised", self.initialised, lambda name: []),
            ("ignored from the checkpoint", self.ignored, lambda name: [self.reasons.get(name, "")]),
        )
        for title, names, detail in sections:
            lines.append(f"  {title} ({len(names)}):")
            lines.extend(f"    {line}" for line in _group_lines(names, detail))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _group_key(name: str):
    """'blocks.3.attn.qkv.weight' -> ('blocks', 3, 'attn'); 'final_layer.linear.bias' -> ('final_layer', None,
    'linear'); 'pos_embed' -> ('pos_embed', None, None)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1].isdigit():
        return parts[0], int(parts[1]), parts[2]
    return parts[0], None, parts[1] if len(parts) > 2 else None


def _index_range(indices) -> str:
    indices = sorted(indices)
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}" if len(indices) > 1 else str(indices[0])
    return ",".join(map(str, indices))


def _group_lines(names, detail) -> List[str]:
    """One line per module group with tensor counts; repeated blocks fold into 'blocks[0-11]: attn, mlp'.

    Sub-modules of the same top-level module are listed together when they cover the same block indices,
    so 'blocks[0-11]: adaLN_modulation' and 'blocks[12-27]: norm1, attn, ...' stay apart.
    """
    per_sub: Dict[tuple, dict] = {}
    for name in names:
        top, index, sub = _group_key(name)
        entry = per_sub.setdefault((top, sub), {"indices": set(), "count": 0, "details": []})
        entry["count"] += 1
        if index is not None:
            entry["indices"].add(index)
        entry["details"].extend(d for d in detail(name) if d and d not in entry["details"])
    lines: Dict[tuple, dict] = {}
    for (top, sub), entry in per_sub.items():
        line = lines.setdefault((top, frozenset(entry["indices"])), {"subs": [], "count": 0, "details": []})
        line["count"] += entry["count"]
        if sub is not None:
            line["subs"].append(sub)
        line["details"].extend(d for d in entry["details"] if d not in line["details"])
    rendered = []
    for (top, indices), line in lines.items():
        label = f"{top}[{_index_range(indices)}]" if indices else top
        subs = f": {', '.join(line['subs'])}" if line["subs"] else ""
        count = f"{line['count']} tensor{'s' if line['count'] != 1 else ''}"
        details = f"  ({'; '.join(line['details'])})" if line["details"] else ""
        rendered.append(f"{label}{subs} - {count}{details}")
    return rendered


def _checkpoint_state_dict(checkpoint) -> Tuple[Dict[str, torch.Tensor], str]:
    """(state dict, description) from a path, a {"model": state_dict, ...} dict or a raw state dict."""
    source = "state dict"
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise UserError(f"pretrained checkpoint {path} does not exist; check the --finetune path.")
        source = str(path)
        checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise UserError(f"the pretrained checkpoint is a {type(checkpoint).__name__}, not a dict; "
                            f"pass a USP/MAE checkpoint (with a 'model' entry) or a state dict.")
    if isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    state_dict = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise UserError(f"the pretrained checkpoint holds no tensors (top-level keys: "
                            f"{sorted(checkpoint)[:8]}); pass a USP/MAE checkpoint with a 'model' state dict.")
    # Checkpoints saved from a DDP-wrapped model carry a "module." prefix.
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}, source


def _is_dit_like(model: nn.Module) -> bool:
    """DiT's layout (x_embedder / t_embedder / blocks), shared by SiT and other DiT-style backbones, versus
    MAE/ViT's (patch_embed): decided by the module names the key mapping relies on, not by the class."""
    return hasattr(model, "x_embedder") and hasattr(model, "t_embedder")


def _patch_grid(model: nn.Module) -> Tuple[int, int]:
    embed = model.x_embedder if _is_dit_like(model) else model.patch_embed
    return tuple(embed.grid_size)


def _resize_pos_embed(pos_embed: torch.Tensor, target: torch.Tensor,
                      target_grid: Tuple[int, int]) -> Tuple[torch.Tensor, str]:
    """Checkpoint (1, prefix + g*g, D) -> target's (1, prefix' + H*W, D).

    Leading prefix tokens (cls) are kept when the target has them and dropped otherwise; the patch
    grid is resized bicubically (in float32) when g x g differs from H x W.
    """
    tokens = pos_embed.shape[1]
    side = math.isqrt(tokens)
    source_prefix = tokens - side * side
    target_prefix = target.shape[1] - target_grid[0] * target_grid[1]
    if source_prefix < 0 or target_prefix < 0:
        raise UserError(f"pretrained pos_embed {tuple(pos_embed.shape)} is not a square grid plus cls tokens.")
    grid = pos_embed[:, source_prefix:]
    changes = []
    if source_prefix > target_prefix:
        changes.append(f"{source_prefix - target_prefix} cls position(s) dropped")
    if (side, side) != tuple(target_grid):
        changes.append(f"grid {side}x{side} -> {target_grid[0]}x{target_grid[1]} bicubic")
        grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=target_grid, mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, target_grid[0] * target_grid[1], -1).to(pos_embed.dtype)
    # A target with more prefix tokens than the checkpoint provides keeps its own for the rest.
    prefix = torch.cat([pos_embed[:, :min(source_prefix, target_prefix)],
                        target[:, source_prefix:target_prefix].to(pos_embed.dtype)], dim=1)
    return torch.cat([prefix, grid], dim=1), ", ".join(changes)


def _width(state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    for name in ("pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.proj.weight"):
        if name in state_dict:
            return state_dict[name].shape[-1]
    return None


def _mismatch_error(mismatches, checkpoint_sd, target_sd) -> UserError:
    # A block matrix shows the width difference most plainly (pos_embed also differs in token count).
    name, model_name, old, new = min(mismatches, key=lambda m: (not m[0].startswith("blocks."), len(m[2]) < 2))
    message = f"checkpoint {name} is {old} but the model expects {new}"
    source_width, target_width = _width(checkpoint_sd), _width(target_sd)
    if source_width is not None and target_width is not None and source_width != target_width:
        size = _SIZE_OF_WIDTH.get(source_width)
        example = f" (a width-{source_width} checkpoint fits the {size} presets)" if size else ""
        message += (f": the checkpoint is from a model of width {source_width} but the model has width {target_width}, "
                    f"so build the model size the checkpoint was pretrained with{example}.")
    else:
        message += (f" ({len(mismatches)} tensors differ in shape): the checkpoint comes from another architecture "
                    f"(MLP ratio, heads or family); use a checkpoint pretrained for this model.")
    return UserError(message)


def _check_block_family(checkpoint_sd, target_sd, report: TransferReport) -> None:
    """Refuses encoder blocks of another family (e.g. ViT's mlp.fc1, norm biases) for LightningDiT-block models."""
    foreign = [name for name in checkpoint_sd if re.match(r"^blocks\.\d+\.", name) and name not in target_sd
               and "beyond --use-pretrain-layer" not in report.reasons.get(name, "")]
    if foreign:
        raise UserError(f"the checkpoint's encoder blocks have tensors LightningDiT does not (e.g. {foreign[0]}): "
                            f"they are not LightningDiT blocks, so pretrain with a lightningdit_*_patch_vae model "
                            f"(or build LightningDiT with the same use_swiglu / use_rmsnorm / use_qknorm flags).")


def _head_init(model: nn.Module, std: float) -> Optional[str]:
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        return None
    # MAE's main_finetune: a tiny head so fine-tuning starts close to the pretrained features.
    nn.init.trunc_normal_(head.weight, std=std)
    nn.init.zeros_(head.bias)
    return f"head newly initialised with trunc_normal(std={std:g}) weights and zero bias (MAE fine-tuning)"


def _select_tensors(model: nn.Module, checkpoint_sd: dict, target_sd: dict, is_dit: bool,
                    use_pretrain_layer: Optional[int], report: TransferReport):
    """Matches checkpoint tensors to model names (renaming MAE's patch_embed for DiT, resizing pos_embed); the
    ones left out get a reason in `report`. Returns ({model name: tensor}, {model name: checkpoint name},
    shape mismatches [(name, model name, shape, expected shape)], prefixes of embeddings/heads that do not fit)."""
    selected, origin, mismatches, skipped_embeddings = {}, {}, [], set()
    for name, tensor in checkpoint_sd.items():
        model_name = name
        if is_dit and name.startswith("patch_embed.proj."):
            model_name = "x_embedder.proj." + name[len("patch_embed.proj."):]
        block = re.match(r"^blocks\.(\d+)\.", name)
        if use_pretrain_layer is not None and block and int(block[1]) >= use_pretrain_layer:
            report.reasons[name] = f"beyond --use-pretrain-layer {use_pretrain_layer}"
            continue
        if model_name not in target_sd:
            report.reasons[name] = next((why for pattern, why in _IGNORE_REASONS if pattern.match(name)),
                                        "not in the model")
            continue
        expected = target_sd[model_name]
        if model_name == "pos_embed" and tensor.shape[-1] == expected.shape[-1]:
            tensor, changes = _resize_pos_embed(tensor, expected, _patch_grid(model))
            if changes:
                report.resized[model_name] = (tuple(checkpoint_sd[name].shape), tuple(tensor.shape))
                report.notes.append(f"{model_name}: {changes}")
        if tensor.shape != expected.shape:
            prefix = next((p for p in _PATCH_EMBEDDINGS + _HEADS if model_name.startswith(p)), None)
            if prefix is None:
                mismatches.append((name, model_name, tuple(tensor.shape), tuple(expected.shape)))
                continue
            skipped_embeddings.add(prefix)
            report.reasons[name] = f"shape {tuple(tensor.shape)} but the model has {tuple(expected.shape)}"
            continue
        selected[model_name], origin[model_name] = tensor, name
    return selected, origin, mismatches, skipped_embeddings


def transfer_pretrained(model: nn.Module, checkpoint: Union[str, Path, dict], use_pretrain_layer: Optional[int] = None,
                        head_init_std: Optional[float] = 2e-5) -> TransferReport:
    """Copies a USP/MAE encoder's weights into `model` (DiT, SiT or ViT) in place; returns the report.

    checkpoint: a file path, a {"model": state_dict, ...} training checkpoint, or a raw state dict.
    use_pretrain_layer: N -> only the first N pretrained blocks are used (DiT/SiT --use-pretrain-layer).
    head_init_std: classifier targets get their head re-initialised with this std when the checkpoint
        does not provide it (MAE fine-tuning: 2e-5; None leaves the model's own head init).
    """
    checkpoint_sd, source = _checkpoint_state_dict(checkpoint)
    is_dit = _is_dit_like(model)
    if not is_dit and not hasattr(model, "patch_embed"):
        raise UserError(f"transfer_pretrained initialises DiT/SiT and ViT/MAE models, not {type(model).__name__}.")
    target_sd = model.state_dict()
    depth = len({int(m[1]) for k in checkpoint_sd for m in [re.match(r"^blocks\.(\d+)\.", k)] if m})
    if use_pretrain_layer is not None and not 0 <= use_pretrain_layer <= depth:  # USP: 0 drops every block
        raise UserError(f"--use-pretrain-layer {use_pretrain_layer} is outside 0..{depth}, the number of blocks "
                            f"in the pretrained checkpoint.")

    target_name = f"{type(model).__name__} (depth {len(model.blocks)}, width {_width(target_sd)})"
    report = TransferReport(source=source, target=target_name)
    selected, origin, mismatches, skipped_embeddings = _select_tensors(
        model, checkpoint_sd, target_sd, is_dit, use_pretrain_layer, report)
    if mismatches:
        raise _mismatch_error(mismatches, checkpoint_sd, target_sd)
    if len(model.blocks) and isinstance(model.blocks[0], LightningEncoderBlock):
        _check_block_family(checkpoint_sd, target_sd, report)

    # A weight and its bias go together: an input embedding whose kernel does not fit (other channels or
    # patch size) is skipped whole, as is a head for another class count.
    for model_name in [n for n in selected if n.startswith(tuple(skipped_embeddings))]:
        report.reasons[origin[model_name]] = "its weight does not fit the model, so it is skipped too"
        del selected[model_name]
    report.renamed = {origin[n]: n for n in selected if origin[n] != n}
    if not selected:
        raise UserError(f"no tensor of the pretrained checkpoint matches the model {type(model).__name__} "
                            f"(checkpoint names like {sorted(checkpoint_sd)[:3]}, model names like "
                            f"{sorted(target_sd)[:3]}); pass a USP/MAE pretraining checkpoint.")

    missing, unexpected = model.load_state_dict(selected, strict=False)
    assert not unexpected, unexpected  # every selected name was checked against the model above
    report.loaded = [n for n in target_sd if n in selected]
    buffers = {name for name, _ in model.named_buffers()}
    report.initialised = [n for n in target_sd if n in missing and n not in buffers]
    tables = sorted({n.rsplit(".", 1)[0] for n in target_sd if n in missing and n in buffers})
    if tables:
        report.notes.append(f"{', '.join(tables)}: fixed tables built by the model, not taken from the checkpoint")
    report.ignored = [n for n in checkpoint_sd if n in report.reasons]
    report.loaded_numel = sum(selected[n].numel() for n in report.loaded)
    report.total_numel = sum(t.numel() for t in target_sd.values())
    if not is_dit and head_init_std is not None and "head.weight" in report.initialised:
        note = _head_init(model, head_init_std)
        if note:
            report.notes.append(note)
    logger.info("%s", report)
    return report
