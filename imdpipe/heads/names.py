"""The names of the model choices, importable without torch (the CLI builds its help from them)."""

FUSIONS = ("imd", "late-concat", "gmu", "se-gate", "nl-gate", "avc", "none", "audio-only")
SIZES = ("tiny", "small", "base", "large")
MODALITIES = ("rgb", "flow", "audio")
