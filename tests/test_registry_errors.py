"""Wrong keywords name the optimizer the user asked for; options the chosen codecs ignore are refused;
optional baselines keep their chatter out of a job's output."""

import subprocess
import sys

import pytest
import torch

import efficient_optim as eo
from efficient_optim.registry import UnknownOptionError, optimizer_entry
from efficient_optim.third_party import ChatterLog, chatter_to, quiet


def model():
    return torch.nn.Linear(128, 64)


def test_a_misspelt_keyword_names_the_registry_name_and_its_options():
    with pytest.raises(TypeError) as info:
        eo.create_optimizer("hybrid_adam", model(), rnak=8)
    message = str(info.value)
    assert "'hybrid_adam'" in message and "'rnak'" in message and "did you mean 'rank'" in message
    assert "m_codec" in message and "min_quantize_numel" in message  # its own and QAdamW's options listed
    assert "__init__" not in message
    assert isinstance(info.value, ValueError)  # an invalid setting, like every other one of this library


@pytest.mark.parametrize("name", ["adamw", "qadamw4", "lion8", "adafactor", "sgd"])
def test_every_registry_name_checks_its_keywords(name):
    with pytest.raises(UnknownOptionError, match=f"optimizer '{name}' has no option 'not_an_option'"):
        eo.create_optimizer(name, model(), not_an_option=1)


def test_keywords_follow_kwargs_to_the_base_class_and_the_factory():
    hybrid = optimizer_entry("hybrid_adam").keywords()
    assert {"m_codec", "v_codec", "rank", "lr", "m_map", "weight_rounding"} <= set(hybrid)
    assert {"lr", "momentum", "nesterov"} <= set(optimizer_entry("sgd").keywords())  # factory's own + SGD's


@pytest.mark.parametrize("kwargs,named", [
    ({"rank": 8}, "rank=8"),  # the HF example's old mistake: the default 4-bit m has no rank
    ({"m_codec": "8bit", "v_codec": "4bit", "rank": 4}, "rank=4"),
    ({"m_codec": "lowrank", "m_map": "linear"}, "m_map"),
    ({"v_block_size": 64}, "v_block_size"),  # v is factored: no blocks
    ({"m_codec": "fp32", "m_rounding": "stochastic"}, "m_rounding"),
    ({"m_codec": "fp32", "v_codec": "factored", "rounding": "stochastic"}, "rounding"),
])  # fmt: skip
def test_options_the_codecs_ignore_are_refused(kwargs, named):
    with pytest.raises(ValueError, match=f"HybridAdam: {named}.*has no effect"):
        eo.create_optimizer("hybrid_adam", model(), **kwargs)


def test_options_that_apply_are_accepted():
    p = model().weight
    eo.HybridAdam([p], m_codec="lowrank", rank=8)
    eo.HybridAdam([p], v_codec="lowrank", rank=8)
    eo.HybridAdam([p], m_map="linear", m_block_size=64, m_rounding="nearest")
    eo.HybridAdam([p], m_codec="bf16", m_rounding="stochastic")
    eo.HybridAdam([p], v_codec="8bit", v_map="linear")
    with pytest.raises(ValueError, match="rank=8 has no effect"):  # per group too
        eo.HybridAdam([{"params": [p], "rank": 8}])


def test_quiet_blocks_go_to_the_chatter_log_only_inside_chatter_to(tmp_path, capfd):
    def noisy():
        print("to stdout")
        print("to stderr", file=sys.stderr)
        import warnings

        warnings.warn("a deprecation", DeprecationWarning, stacklevel=1)

    log = ChatterLog()
    with chatter_to(log), quiet("a noisy import"):
        noisy()
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    log.keep_in(tmp_path / "run" / "third_party.log")
    text = (tmp_path / "run" / "third_party.log").read_text()
    assert "==> a noisy import" in text and "to stdout" in text and "to stderr" in text and "a deprecation" in text
    with quiet("no log active"):  # a user's own script: nothing is hidden
        print("visible")
    assert "visible" in capfd.readouterr().out


def test_building_a_baseline_inside_a_job_prints_nothing():
    pytest.importorskip("bitsandbytes")
    code = (
        "import torch, efficient_optim as eo\n"
        "from efficient_optim.third_party import ChatterLog, chatter_to\n"
        "log = ChatterLog()\n"
        "with chatter_to(log):\n"
        "    eo.create_optimizer('adamw_bnb_8bit', torch.nn.Linear(64, 64))\n"
        "print('done')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "done\n" and run.stderr == ""
