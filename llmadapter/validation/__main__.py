"""The command line: `MODEL_URI` prints the validation report; `--worker FD MODEL_URI` runs the worker."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from llmadapter.validation.runner import validate_model
from llmadapter.validation.worker import serve


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 3 and args[0] == "--worker":
        return serve(int(args[1]), args[2])
    if len(args) == 1 and not args[0].startswith("-"):
        report = validate_model(args[0])
        print(report.to_markdown())
        return 0 if report.passed else 1
    print("usage: python -m llmadapter.validation MODEL_URI", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
