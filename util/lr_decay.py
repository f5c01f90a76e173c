"""Layer-wise learning-rate decay for ViT fine-tuning (BEiT / MAE `util/lr_decay.py`, USP likewise).

Layer ids: cls_token, pos_embed and patch_embed.* are layer 0, blocks.i.* is layer i + 1, and every
other parameter (the final norm, fc_norm, head) is layer depth + 1, so its lr_scale is
layer_decay ** 0 = 1. (timm's param_groups_layer_decay instead puts the final `norm` with the last
block, scale layer_decay, which changes the cls-token recipe.) No weight decay on 1-D parameters
(biases, norm weights) and on the names in no_weight_decay_list.
"""


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """The layer id of parameter `name` in a ViT with num_layers = depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model, weight_decay: float = 0.05, no_weight_decay_list=(), layer_decay: float = 0.75):
    """Optimizer groups, one per (layer, decay / no decay), each with lr_scale and weight_decay.

    model needs `blocks` (its depth) and named_parameters; frozen parameters are left out.
    """
    num_layers = len(model.blocks) + 1
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim == 1 or name in no_weight_decay_list)
        layer_id = layer_id_for_vit(name, num_layers)
        key = (layer_id, decays)
        if key not in groups:
            groups[key] = {"lr_scale": layer_decay ** (num_layers - layer_id),
                           "weight_decay": weight_decay if decays else 0.0, "params": []}
        groups[key]["params"].append(param)
    return list(groups.values())
