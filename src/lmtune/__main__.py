"""`python -m lmtune ...` (also what `torchrun -m lmtune ...` runs)."""

from lmtune.cli import main

if __name__ == "__main__":
    main()
