"""Model code of IMD: visual two-stream transformer, audio bottleneck, IMD and baseline fusions.

Pure model code: no I/O, no CLI, no device choice. Entry points::

    from imdpipe.heads import ModelConfig, build_model, FUSIONS, SIZES
    model = build_model(ModelConfig(num_classes=8, size="tiny"), init_checkpoint=None)
    logits, rev = model(rgb, flow, audio)
"""

from .names import FUSIONS, MODALITIES, PAPER_INIT, SIZES

# Everything else pulls in torch and timm, so it is imported on first use: `imdpipe --help` and
# the config code only need the names above.
_LAZY = {
    "AudioBottleneck": "audio",
    "FUSION_LAYERS": "fusion", "IMDFusion": "fusion", "IrrelevantModalityDropout": "fusion",
    "RelevanceNetwork": "fusion", "build_fusion": "fusion", "irrelevant_modality_dropout": "fusion",
    "ModelConfig": "model", "MultimodalActionModel": "model", "build_model": "model", "init_model": "model",
    "FactorizedBlock": "visual", "SpatialBlock": "visual", "TwoStreamTransformer": "visual",
    "VisualConfig": "visual", "VisualTransformer": "visual", "build_two_stream": "visual",
    "load_vit_checkpoint": "visual", "visual_config": "visual",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FUSIONS",
    "FUSION_LAYERS",
    "MODALITIES",
    "PAPER_INIT",
    "SIZES",
    "AudioBottleneck",
    "FactorizedBlock",
    "IMDFusion",
    "IrrelevantModalityDropout",
    "ModelConfig",
    "MultimodalActionModel",
    "RelevanceNetwork",
    "SpatialBlock",
    "TwoStreamTransformer",
    "VisualConfig",
    "VisualTransformer",
    "build_fusion",
    "build_model",
    "build_two_stream",
    "init_model",
    "irrelevant_modality_dropout",
    "load_vit_checkpoint",
    "visual_config",
]
