"""`python -m raylm.eval ARGS`: lm-eval's own command line, with the `raylm` model registered."""

from raylm.eval.lm import main

main()
