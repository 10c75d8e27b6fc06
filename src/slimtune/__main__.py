"""``python -m slimtune`` (and so ``accelerate launch -m slimtune ...`` / ``torchrun -m slimtune ...``)."""

from slimtune.cli import main

main()
