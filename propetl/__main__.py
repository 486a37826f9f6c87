"""`python -m propetl ...`: propetl-train (what torchrun and accelerate launch start, one process per device)."""

from propetl.cli.train import main

main()
