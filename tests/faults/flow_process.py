"""A log-and-validate flow run in a process of its own, for the fault scenarios to kill with SIGKILL.

`python -m tests.faults.flow_process SOURCE NAME RESULT_FILE`: runs log-and-validate (validation in a
fresh worker process, as deployed), writes its result as JSON to RESULT_FILE, then reads a line from
stdin: `promote` runs the promote flow for NAME (which pauses for approval), anything else exits.
Prefect, MLflow and llmadapter settings come from the environment.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(source: str, name: str, result_file: str) -> None:
    from flows.log_and_validate import log_and_validate

    result = log_and_validate(source=source, model_name=name)
    written = Path(f"{result_file}.partial")
    written.write_text(result.model_dump_json())
    written.replace(result_file)  # whole or absent for the test that polls for it
    if sys.stdin.readline().strip() == "promote":
        from flows.promote import promote

        promote(model_name=name, poll_interval_s=1, timeout_s=600)


if __name__ == "__main__":
    main(*sys.argv[1:])
