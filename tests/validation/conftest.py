"""The validation tests' MLflow store: one real SQLite store shared by the package (tables cost seconds)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import shared_store


@pytest.fixture(scope="package")
def store(tmp_path_factory: pytest.TempPathFactory, _mlflow_db_template: Path) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("validation")
    with shared_store(root, _mlflow_db_template, "validation"):
        yield root
