"""torch.hub entry points: one per model name of the four families (mae_vit_*, chamae_vit_*, vit_*, channelvit_*).

``weights`` is a model folder (export_model.py) or a checkpoint file; without it the model is randomly initialised
(``kwargs`` are then the model's constructor options). Nothing is downloaded: no weights are published yet.

    model = torch.hub.load("path/to/ChannelMAE", "channelvit_base_patch16", source="local", weights="my_model")

A folder or file holds its own size, so the entry point's name only picks the family: ``mae_*`` / ``chamae_*`` need a
decoder, ``vit_*`` / ``channelvit_*`` give the encoder (a pretraining model's without its decoder) with the saved
head, if any. For files that record no model (published MAE files) the name is the architecture and ``kwargs``
complete it (e.g. ``num_heads=2``).
"""

import models_chamae
import models_mae
import models_vit
from models_folder import load as _load

dependencies = ["torch", "timm", "safetensors", "huggingface_hub"]


def _entry(name: str, pretrain: bool):
    create = models_chamae.create_model if pretrain else models_vit.create_model

    def entry(weights: str | None = None, **kwargs):
        if weights:
            return _load(weights, model=name, decoder=pretrain, **kwargs)
        return create(name, **kwargs)

    kind = "pretraining model (with decoder)" if pretrain else "encoder / classifier"
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"{name}: {kind}; weights: a model folder or checkpoint file (default: random initialisation)."
    return entry


for _name in [*models_mae.MODELS, *models_chamae.MODELS]:
    globals()[_name] = _entry(_name, pretrain=True)
for _name in models_vit.MODELS:
    globals()[_name] = _entry(_name, pretrain=False)
