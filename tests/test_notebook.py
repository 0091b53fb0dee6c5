"""analyze.ipynb runs headless against a tiny study made on synthetic data."""
import json
from pathlib import Path

import pytest

import study

pytestmark = pytest.mark.slow  # processes, whole runs or W&B: the full suite only (pytest -m "not slow" skips)

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "analyze.ipynb"


def test_notebook_is_committed_with_outputs_cleared():
    nb = json.loads(NOTEBOOK.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_notebook_runs_headless_on_a_tiny_study(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "study: tiny\n"
        "base: {dataset: synthetic, synthetic_size: 128, batch_size: 32, codebook_size: 16, n_hid: 8, latent_dim: 4,\n"
        "       epochs: 2, log_every: 1, eval_batch_size: 64, wandb: false, device: cpu}\n"
        "runs:\n"
        "  - {name: baseline, quantizer: vq_ema}\n"
        "  - {name: ba_iters5, quantizer: ba_vq, ba_iters: 5, beta_start: 0.5, beta_end: 3.0}\n")
    study.run_sweep(sweep, flags={"out_dir": str(tmp_path)}, seeds=2)
    monkeypatch.setenv("STUDY_DIR", str(tmp_path / "tiny"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figures
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 7      # metrics, BA against its matched baselines, rate–distortion, perplexity/β, PSNR per epoch, usage, reconstructions
    table = next(o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
    assert "| 1 | baseline |" in table and "| 2 | ba_iters5 |" in table and "±" in table
