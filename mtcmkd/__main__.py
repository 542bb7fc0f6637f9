"""`python -m mtcmkd ...` == `mtcmkd ...` (what torchrun, deepspeed and srun launch)."""

from mtcmkd.cli.main import main

main()
