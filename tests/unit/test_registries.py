"""The name tables (one per extension point): every entry imports, and the names users see keep their order."""
from __future__ import annotations

import pytest

from common.registry import load
from data_pipeline.backends.registry import BACKENDS
from data_pipeline.readers.registry import READERS
from launch.cli import build_parser
from trainer.components.loss_registry import LOSSES
from trainer.meta.modes import LOOKAHEADS

TABLES = {"backends": BACKENDS, "readers": READERS, "losses": LOSSES, "lookaheads": LOOKAHEADS}


@pytest.mark.parametrize("table", TABLES, ids=str)
def test_every_entry_names_a_callable_that_exists(table):
    entries = TABLES[table]
    assert entries
    for name in entries:
        assert callable(load(entries, name)), f"{table}[{name!r}] = {entries[name]!r}"


def test_prepare_lists_the_raw_layouts_in_its_usual_order():
    prepare = build_parser()._subparsers._group_actions[0].choices["prepare"]
    dataset = next(a for a in prepare._actions if a.dest == "dataset")
    # help text and "invalid choice" errors print this order; `prepared` is an output, never an input
    assert list(dataset.choices) == ["aptos", "eyepacs", "ddr", "idrid", "messidor2", "csv"]
