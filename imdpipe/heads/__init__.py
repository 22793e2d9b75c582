"""Model code of IMD: visual two-stream transformer, audio bottleneck, IMD and baseline fusions.

Pure model code: no I/O, no CLI, no device choice. Entry points::

    from imdpipe.heads import ModelConfig, build_model, FUSIONS, SIZES
    model = build_model(ModelConfig(num_classes=8, size="tiny"), init_checkpoint=None)
    logits, rev = model(rgb, flow, audio)
"""

from .audio import AudioBottleneck
from .fusion import (
    FUSION_LAYERS,
    IMDFusion,
    IrrelevantModalityDropout,
    RelevanceNetwork,
    irrelevant_modality_dropout,
)
from .model import FUSIONS, MODALITIES, SIZES, ModelConfig, MultimodalActionModel, build_model
from .visual import (
    FactorizedBlock,
    SpatialBlock,
    TwoStreamTransformer,
    VisualConfig,
    VisualTransformer,
    build_two_stream,
    load_vit_checkpoint,
    visual_config,
)

__all__ = [
    "FUSIONS",
    "FUSION_LAYERS",
    "MODALITIES",
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
    "build_model",
    "build_two_stream",
    "irrelevant_modality_dropout",
    "load_vit_checkpoint",
    "visual_config",
]
