"""The names of the model choices, importable without torch (the CLI builds its help from them)."""

FUSIONS = ("imd", "late-concat", "gmu", "se-gate", "nl-gate", "avc", "none", "audio-only")
SIZES = ("tiny", "small", "base", "large")
MODALITIES = ("rgb", "flow", "audio")

#: The ImageNet-21K ViT each size starts from in the paper (supplementary Sec. 2.2: "each ... is
#: initialized with its ViT corresponding ImageNet-21K weights"), as timm pretrained names.
#: None: no such checkpoint exists for the size's shape (tiny is the demo's size; small keeps the
#: legacy 768-wide, 8-block ViT-S shape of the paper's parameter count, whose ImageNet-1K weights
#: timm no longer ships and which never had ImageNet-21K weights).
PAPER_INIT = {
    "tiny": None,
    "small": None,
    "base": "vit_base_patch16_224.augreg_in21k",
    "large": "vit_large_patch16_224.augreg_in21k",
}
