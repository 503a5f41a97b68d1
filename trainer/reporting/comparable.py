"""Whether report runs can be compared metric for metric: only when they were evaluated on the same test images."""
from __future__ import annotations


def same_test_set(runs) -> bool:
    """``runs``: loaded ``RunResult``s. Same test images (by source id) in every run: only then does a difference
    of metrics mean something."""
    return all(sorted(r.source_ids) == sorted(runs[0].source_ids) for r in runs[1:])


def test_set_warning(runs) -> str | None:
    """One line when the runs' test sets differ (other data, split seed or fractions), else None."""
    if same_test_set(runs):
        return None
    sizes = ", ".join(f"{r.label or r.name} n={len(r.source_ids)}" for r in runs)
    return f"the runs were evaluated on different test sets ({sizes}); no B − A difference is given"
