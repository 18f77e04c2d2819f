"""Execute both evaluation notebooks top to bottom (tiny models, shipped samples) with nbclient."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _execute(name: str, out_dir: Path, monkeypatch) -> "nbformat.NotebookNode":  # noqa: F821
    import nbformat
    from nbclient import NotebookClient

    # The kernel is the ipykernel of the interpreter running the tests (the venv's "python3"); nothing is
    # registered globally. Outputs go to a temporary directory.
    monkeypatch.setenv("KEEPR_NB_OUT", str(out_dir))
    monkeypatch.setenv("WANDB_MODE", "offline")
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()
    return nb


def _outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == kind]


@pytest.mark.slow
def test_encoder_eval_notebook(tmp_path, monkeypatch):
    nb = _execute("encoder_eval", tmp_path, monkeypatch)
    out = tmp_path / "encoder_eval"
    assert (out / "training_curves.png").is_file()
    assert (out / "inversion" / "encoder_reconstructions.png").is_file()
    text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
    assert "last val latent MSE" in text
    images = [o for o in _outputs(nb, "display_data") + _outputs(nb, "execute_result")
              if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the training curves and the reconstructions figure


@pytest.mark.slow
def test_anonymization_eval_notebook(tmp_path, monkeypatch):
    nb = _execute("anonymization_eval", tmp_path, monkeypatch)
    res = tmp_path / "anonymization_eval" / "results"
    for f in ("results.csv", "results.md", "leakage_vs_realism.png", "identity_distance.png"):
        assert (res / f).is_file(), f
    table = (res / "results.md").read_text()
    for m in ("keepr", "blur", "mosaic", "blackbox", "none"):
        assert f"| {m} |" in table
    md = [o for o in _outputs(nb, "display_data") if "text/markdown" in o.get("data", {})]
    assert md and "| method |" in md[0]["data"]["text/markdown"]
