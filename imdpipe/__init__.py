"""imdpipe: offline-first feature caches and a head trainer for IMD multimodal action recognition.

Reproduces "Learnable Irrelevant Modality Dropout for Multimodal Action Recognition on
Modality-Specific Annotated Videos" (Alfasly et al.). See README.md and cache_layout.md.
"""

__version__ = "0.1.0"
