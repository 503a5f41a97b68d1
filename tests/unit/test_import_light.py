"""`metaloss prepare` / `synth` and the config never pay for torch: the data layer's public API is lazy (PEP 562)."""
from __future__ import annotations

import subprocess
import sys

from tests.support.cli import REPO


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_prepare_and_synth_import_without_torch():
    mods = _modules_after("import data_pipeline.prepare, data_pipeline.synth")
    assert "data_pipeline.prepare" in mods and "data_pipeline.synth" in mods
    assert "torch" not in mods


def test_config_and_registries_import_without_torch():
    mods = _modules_after("import trainer.config, data_pipeline.settings, data_pipeline.types, "
                          "data_pipeline.backends.registry")
    assert "trainer.config" in mods
    assert "torch" not in mods


def test_lazy_public_api_resolves_on_use():
    import data_pipeline

    assert data_pipeline.build_streams is __import__("data_pipeline.factory", fromlist=["x"]).build_streams
    assert set(data_pipeline.__all__) <= set(dir(data_pipeline))
    for name in data_pipeline.__all__:
        assert getattr(data_pipeline, name) is not None
