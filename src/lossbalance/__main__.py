"""``python -m lossbalance``: the command line (see :mod:`lossbalance.cli`)."""

from lossbalance.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m lossbalance"))
