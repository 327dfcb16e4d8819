"""Run an experiment from Python instead of the command line.

The same code path as ``lossbalance demo``: a config dataclass, ``run(config)``, and the
report writer. Here: the demo's ten weighted per-class terms on the 8x8 digits with a few
balancers next to MTAdam, two seeds, a short schedule (about 20 s on 2 CPU cores).

    python examples/experiment_api.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from lossbalance.experiments import demo
from lossbalance.experiments.report import write_report


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/example")
    config = demo.DemoConfig(
        methods=["balanced-adam", "adam", "mtadam", "imtl-g", "uncertainty"],
        seeds=2,
        epochs=20,
    )
    result = demo.run(config)
    paths = write_report(result, out, "python examples/experiment_api.py " + str(out))
    sys.stdout.write((out / "results.md").read_text())
    sys.stdout.write("\n".join(str(p) for p in paths) + "\n")


if __name__ == "__main__":
    main()
