"""``effopt characterize --quick`` end to end on a tiny model: runs, report, JSON, figures, resume."""

import json

import torch

from efficient_optim.cli import main

TINY = ["--quick", "--no-progress", "--device", "cpu", "--steps", "4", "--width", "32", "--heads", "2", "--context", "16",
        "--batch", "4", "--eval-batches", "1", "--eval-every", "0", "--checkpoint-every", "0", "--probe-every", "2",
        "--synthetic-steps", "20", "--only", "fp32,naive4,zerofree+ec10,naive+learned,sens:none,sens:wte"]


def test_characterize_quick_runs_end_to_end(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "char"
        assert main(["characterize", *TINY, "--out", str(out)]) == 0
        report = (out / "report.md").read_text()
        for question in ("Does naive 4-bit fail here", "do outliers persist", "linearly or sub-linearly",
                         "Which fix recovers how much", "P5", "P6", "early vs late"):
            assert question in report
        data = json.loads((out / "characterization.json").read_text())
        keys = {c["key"] for c in data["configs"]}
        assert {"fp32", "naive4", "zerofree+ec10", "naive+learned", "sens:none", "sens:wte"} == keys
        fp32 = next(c for c in data["configs"] if c["key"] == "fp32")
        assert fp32["final_val_loss"] is not None and fp32["gap_pct"] == 0
        assert data["answers"]["naive"]["measured"]
        assert data["p5_synthetic"]["steps"]
        for fig in ("fig_loss.png", "fig_distributions.png", "fig_p5_synthetic.png"):
            assert (out / fig).stat().st_size > 1000
        probes = list(out.glob("*/*/seed0/probes.jsonl"))
        assert len(probes) == 6
        # resume: nothing is retrained, the report is rebuilt (figures kept: no input changed)
        capsys.readouterr()
        assert main(["characterize", *TINY, "--out", str(out), "--resume"]) == 0
        assert "(seed 0)" not in capsys.readouterr().out
        assert main(["characterize", *TINY, "--out", str(out)]) == 2  # a folder with runs needs --resume
        assert main(["characterize", "--report-only"]) == 2  # needs --out
    finally:
        torch.set_num_threads(threads)
