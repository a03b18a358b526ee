"""python -m omni_model.compat [--fingerprints]: check every seam against the installed upstream code."""

from __future__ import annotations

import argparse
import sys

from . import SEAMS, installed_versions
from .registry import UpstreamChanged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omni_model.compat", description=__doc__.splitlines()[0])
    parser.add_argument("--fingerprints", action="store_true", help="print each seam's fingerprint on this install")
    args = parser.parse_args(argv)
    failed = 0
    installed = installed_versions()
    print("installed:", ", ".join(f"{p} {v}" for p, v in installed.items()))
    for seam in SEAMS:
        if installed.get(seam.package) is None:
            print(f"absent  {seam.name} ({seam.package} is not installed)")
            continue
        if args.fingerprints:
            print(f"{seam.name}: {seam.current_fingerprint()!r}")
            continue
        try:
            seam.verify()
            print(f"ok      {seam.name}")
        except UpstreamChanged as exc:
            failed += 1
            print(f"CHANGED {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
