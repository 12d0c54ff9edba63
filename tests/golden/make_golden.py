"""Write ``golden.npz``: today's NumPy outputs of a dozen configurations,
pinned bit for bit by ``tests/suites/test_golden.py``.

Run once, before a refactoring: ``python tests/golden/make_golden.py``. The
test recomputes every case and requires exact equality, so a restructuring
that changes one bit of any output fails it.
"""

from __future__ import annotations

import os
import sys

import numpy as np

# tests/, so that the test-support package imports as pytest imports it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support.golden_cases import CASES  # noqa: E402


def main() -> None:
    out = {}
    for name, case in CASES.items():
        for i, a in enumerate(case()):
            out[f"{name}/{i}"] = a
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden.npz")
    np.savez_compressed(path, **out)
    print(f"wrote {len(out)} arrays of {len(CASES)} cases to {path}")


if __name__ == "__main__":
    main()
