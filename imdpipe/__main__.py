"""`python -m imdpipe` (also how torchrun launches stages: `torchrun ... -m imdpipe train ...`)."""

from imdpipe.cli.main import app

app(prog_name="imdpipe")
