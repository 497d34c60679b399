"""`python -m ldm_pipeline ...` runs the `ldm` command (also under `accelerate launch -m ldm_pipeline`)."""

from .apps.cli import main

main()
