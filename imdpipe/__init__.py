"""imdpipe."""
