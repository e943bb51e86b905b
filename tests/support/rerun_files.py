"""Reading a `.rrd` back with Rerun's own reader, for the `--rerun` tests of the robot and the server."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pyarrow as pa
from rerun.chunk import RrdReader


def read_rrd(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Every row of the recording in `path`, by entity path (as `/robots/arm-1/executed/0`), each row a
    dict of its columns: components (`Scalars:scalars`, ...) and timelines (`step`, `time`)."""
    rows: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for chunk in RrdReader(path).stream().to_chunks():
        if chunk.is_static:
            continue
        batch = chunk.to_record_batch()
        columns = {  # `time` in integer nanoseconds: Python's datetime holds microseconds
            field.name: (column.cast(pa.int64()) if pa.types.is_timestamp(field.type) else column).to_pylist()
            for field, column in zip(batch.schema, batch.columns, strict=True)
        }
        rows[chunk.entity_path].extend(
            dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)
        )
    return rows
