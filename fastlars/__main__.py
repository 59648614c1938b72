"""``python -m fastlars``: the environment report, then every usable backend checked against the reference.

    python -m fastlars            # text: the report, one line per case, a summary; exit 1 on any mismatch
    python -m fastlars --json     # the same as one JSON object, for issue reports

See fastlars.selfcheck for what a case runs and how it is judged.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from fastlars import selfcheck
from fastlars.env import env_info, env_report


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report and the self-check; 0 when every case matches the reference, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m fastlars", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object (environment, cases, ok)")
    args = parser.parse_args(argv)
    info = env_info()
    if args.json:
        results = selfcheck.run()
        ok = all(r.ok for r in results)
        print(json.dumps({"environment": info, "steps": selfcheck.STEPS, "cases": selfcheck.as_json(results),
                          "ok": ok}, indent=2))
        return 0 if ok else 1
    print(env_report(info))
    print(f"\nself-check: {selfcheck.STEPS} steps per case, compared with the reference backend on the same device "
          "(step: fastest after the first)")
    results = selfcheck.run(lambda r: print(selfcheck.describe(r), flush=True))
    failed = [r for r in results if not r.ok]
    names = ", ".join(f"{r.device}/{r.backend}/{r.algorithm}/{r.dtype}" for r in failed)
    print(f"\n{len(results) - len(failed)} of {len(results)} cases match the reference"
          + (f"; FAILED: {names}" if failed else ""))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
