"""Train a model through the harness and keep its final weights, for studies that reuse a trained model
(``effopt finetune`` fine-tunes a pretrained LM, ``effopt landscape`` probes the loss around solutions).

``train_and_keep(cfg, run_dir)`` runs ``bench.train.train_run`` (so the run is the harness's: same loop,
metrics, checkpoints, resume, divergence rule) with a ``SaveFinalWeights`` callback that writes the model's
final ``state_dict`` to ``run_dir/final_weights.pt`` (loadable with ``torch.load(weights_only=True)``) before
the run's checkpoint is removed. A finished run is not trained again: its saved weights are reused.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .callbacks import Callback
from .config import RunConfig
from .tasks import build_task
from .train import resolve_device, train_run

WEIGHTS_FILE = "final_weights.pt"


class SaveFinalWeights(Callback):
    """Write the model's final weights when the run ends (``on_run_end``), and name the file in its summary row.

    Args:
        path: where (a ``.pt`` file; written atomically).
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_run_end(self, ctx, result: dict) -> None:
        state = {k: v.detach().to("cpu") for k, v in ctx.model.state_dict().items()}
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)
        result["final_weights"] = self.path.name


def train_and_keep(cfg: RunConfig, run_dir: Path, progress=None) -> tuple[dict, Path]:
    """Train ``cfg`` in ``run_dir`` (or reuse the finished run there) and return ``(summary row, weights path)``.

    Args:
        cfg: the run's settings.
        run_dir: the run's folder (``bench.train.train_run``'s).
        progress: an object with ``update(n)`` / ``set_postfix_str(s)`` (a tqdm bar), or ``None``.

    Raises:
        FileNotFoundError: ``run_dir`` holds a finished run without saved weights (trained by another command).
    """
    path = Path(run_dir) / WEIGHTS_FILE
    row = train_run(cfg, Path(run_dir), callbacks=[SaveFinalWeights(path)], progress=progress)
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} holds a finished run without {WEIGHTS_FILE} (not trained by a command that "
                                "keeps weights); use another --out")  # fmt: skip
    return row, path


def load_trained(cfg: RunConfig, weights: Path, device: str | torch.device = "cpu"):
    """``(task, model)``: ``cfg``'s task and a model of its architecture holding the saved ``weights``.

    Args:
        cfg: the settings the weights were trained with (model shape, data, tokenizer).
        weights: a ``final_weights.pt`` written by ``SaveFinalWeights``.
        device: where the model goes (default CPU).
    """
    device = resolve_device(str(device))
    task = build_task(cfg, device)
    model = task.build_model()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return task, model.to(device=device, dtype=getattr(torch, cfg.param_dtype))


def no_autocast():
    """The ``autocast`` argument of ``task.evaluate`` on a CPU: a context that does nothing."""
    return contextlib.nullcontext()
