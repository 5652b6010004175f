"""How every benchmark finds raylm: the checkout this folder sits in goes first on `sys.path`.

A benchmark runs as a script (`python benchmarks/train.py`), so Python puts `benchmarks/` on `sys.path`
and nothing else of the repository. Each benchmark's first import is `import _repo`, which puts the
repository root in front: `import raylm` (and `tests.train_helpers`, which some benchmarks share) then load
this checkout's code, installed or not, from any working directory. No file in `benchmarks/` may share a
name with a standard-library module (`tests/test_scripts.py` checks), so `benchmarks/` itself can stay
on the path. The root also goes in front of `PYTHONPATH`, so the Ray workers a benchmark starts (they
inherit the driver's environment) import the same checkout rather than whichever raylm is installed.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA_DEFAULT = ROOT.parent / "shared" / "data"

if str(ROOT) not in sys.path[:2]:
    sys.path.insert(0, str(ROOT))

_paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
if str(ROOT) not in _paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, _paths)])
