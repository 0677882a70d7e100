"""Dispatch ``python -m evformer.bench <name> [options]`` to ``evformer.bench.<name>.main``."""

from __future__ import annotations

import importlib
import sys

from evformer.bench import BENCHMARKS


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        lines = [f"  {name:<8} {what}" for name, what in BENCHMARKS.items()]
        usage = "usage: python -m evformer.bench <name> [options]\n\nbenchmarks:\n"
        print(usage + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown benchmark {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(f"evformer.bench.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
