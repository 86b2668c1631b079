"""Layer-wise learning-rate decay (as in BEiT / MAE fine-tuning).

With ``num_layers = depth + 1``, parameter ``layer_id`` is 0 for the tokenizer (``cls_token``, ``pos_embed``,
``patch_embed.*``, ``channel_embed``), ``i + 1`` for ``blocks.i.*`` and ``num_layers`` for everything else (final
norm, ``fc_norm``, head). Its lr is multiplied by ``lr_scale = layer_decay ** (num_layers - layer_id)``, so the head
trains at the full lr and the tokenizer at ``layer_decay ** (depth + 1)``. 1-D parameters (biases, norm scales) and
the names in ``no_weight_decay_list`` get no weight decay.

``timm.optim.param_groups_layer_decay`` is not used: it derives layer ids from ``model.group_matcher()``, which does
not know our ``channel_embed`` (it would be put at the top layer) and is keyed to timm's own module names.
"""

_STEM_PREFIXES = ("cls_token", "pos_embed", "patch_embed", "channel_embed")


def get_layer_id(name: str, num_layers: int) -> int:
    """Layer index of parameter ``name`` for a ViT with ``num_layers - 1`` blocks."""
    if name.split(".")[0] in _STEM_PREFIXES:
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(
    model, weight_decay: float = 0.05, no_weight_decay_list=(), layer_decay: float = 0.75
) -> list[dict]:
    """Optimizer param groups with a per-layer ``lr_scale`` and per-parameter weight decay.

    Frozen parameters (``requires_grad=False``) are left out. Each group dict has ``params``, ``weight_decay``,
    ``lr_scale`` and ``name`` (``layer_<id>_<decay|no_decay>``).
    """
    num_layers = len(model.blocks) + 1
    no_wd = set(no_weight_decay_list)
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim == 1 or name in no_wd)
        layer_id = get_layer_id(name, num_layers)
        key = f"layer_{layer_id}_{'decay' if decay else 'no_decay'}"
        if key not in groups:
            groups[key] = {
                "name": key,
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (num_layers - layer_id),
            }
        groups[key]["params"].append(param)
    return list(groups.values())
