"""Checks of the logged artifact as MLflow describes it (ModelInfo): task, signature and flavor metadata."""

from __future__ import annotations

from typing import Any

from llmadapter.catalog import TaskSpec
from llmadapter.validation.report import CheckResult


def logged_task(info: Any) -> str | None:
    """The task the model was logged with (metadata.task, else the flavor's inference_task)."""
    task = (info.metadata or {}).get("task") or info.flavors.get("transformers", {}).get("inference_task")
    return str(task) if task is not None else None


def _colspec_dict(spec: Any) -> dict[str, Any]:
    return dict(spec.to_dict())


def check_signature(logged: Any, task: str) -> CheckResult:
    """The logged signature holds every field of MLflow's own llm/v1 signature, same type/requiredness
    (or, for the fields the catalog widens, our wider type)."""
    from mlflow.transformers.llm_inference_utils import _SIGNATURE_FOR_LLM_INFERENCE_TASK

    from llmadapter.catalog import WIDENED_FIELDS, widened_colspec

    native = _SIGNATURE_FOR_LLM_INFERENCE_TASK.get(task)
    if native is None:
        return CheckResult(name="signature", passed=False, detail=f"no MLflow signature for task '{task}'")
    if logged is None:
        return CheckResult(name="signature", passed=False, detail="the model was logged without a signature")
    problems: list[str] = []
    for part in ("inputs", "outputs"):
        want_schema = getattr(native, part)
        have_schema = getattr(logged, part)
        if want_schema is None:
            continue
        have = {s.name: s for s in (have_schema.inputs if have_schema is not None else [])}
        for want in want_schema.inputs:
            got = have.get(want.name)
            if got is None:
                problems.append(f"{part}.{want.name} missing")
            elif part == "inputs" and want.name in WIDENED_FIELDS:
                if _colspec_dict(got) not in (_colspec_dict(want), _colspec_dict(widened_colspec(want.name))):
                    problems.append(f"{part}.{want.name} is {_colspec_dict(got)}, neither MLflow's nor ours")
            elif _colspec_dict(got) != _colspec_dict(want):
                problems.append(
                    f"{part}.{want.name} is {_colspec_dict(got)}, MLflow has {_colspec_dict(want)}"
                )
    n_in = len(native.inputs.inputs)
    extra = len(logged.inputs.inputs) - n_in if logged.inputs is not None else 0
    detail = "; ".join(problems) or f"all {n_in} MLflow input fields present, {extra} optional extra fields"
    return CheckResult(name="signature", passed=not problems, detail=detail)


def check_flavor_metadata(info: Any, spec: TaskSpec) -> CheckResult:
    """flavors.transformers.task/inference_task and metadata.task as MLflow writes them; our pyfunc loader."""
    task = spec.inference_task
    flavor = info.flavors.get("transformers")
    problems: list[str] = []
    if flavor is None:
        problems.append("no transformers flavor")
    else:
        if flavor.get("task") not in spec.native_tasks:
            problems.append(
                f"transformers.task is {flavor.get('task')!r}, expected one of {spec.native_tasks}"
            )
        if flavor.get("inference_task") != task:
            problems.append(f"transformers.inference_task is {flavor.get('inference_task')!r}")
    meta_task = (info.metadata or {}).get("task")
    if meta_task != task:
        problems.append(f"metadata.task is {meta_task!r}")
    loader = info.flavors.get("python_function", {}).get("loader_module", "")
    if not str(loader).startswith("llmadapter"):
        problems.append(f"python_function loader is {loader!r}, not llmadapter's engine")
    detail = "; ".join(problems) or f"task {flavor.get('task') if flavor else None}, inference_task {task}"
    return CheckResult(name="flavor-metadata", passed=not problems, detail=detail)
