"""Prefect artifacts: progress of long tasks (updated per epoch) and the tables and notes a person wants to see."""
from __future__ import annotations

import math
from typing import Any


class Progress:
    """A Prefect progress artifact for `total` steps (epochs), attached to the current flow or task run."""

    def __init__(self, key: str, total: int, description: str):
        from prefect.artifacts import create_progress_artifact

        self.total = max(int(total), 1)
        self.description = description
        self.id = create_progress_artifact(0.0, key=key, description=description)

    def update(self, done: int, note: str | None = None) -> None:
        from prefect.artifacts import update_progress_artifact

        percent = min(100.0, 100.0 * done / self.total)
        update_progress_artifact(self.id, percent, description=f"{self.description}: {note}" if note else None)

    def done(self, note: str | None = None) -> None:
        self.update(self.total, note)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else str(value)
    return value


def table(key: str, rows: list[dict], description: str) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(key=key, table=[{k: _cell(v) for k, v in row.items()} for row in rows],
                          description=description)


def markdown(key: str, text: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=key, markdown=text, description=description)


def metrics_markdown(title: str, metrics: dict, extra: str = "") -> str:
    lines = [f"### {title}", "", "| metric | value |", "| --- | --- |"]
    for key, value in metrics.items():
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            lines.append(f"| {key} | {_cell(value)} |")
    return "\n".join(lines) + ("\n\n" + extra if extra else "") + "\n"
