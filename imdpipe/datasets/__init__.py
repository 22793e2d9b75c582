"""Dataset generators (the synthetic audio-visual dataset of the demo)."""
