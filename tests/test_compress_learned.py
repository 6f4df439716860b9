"""The learned compression policy: network and policy file, behaviour cloning, PPO, training and its command."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import efficient_optim as eo
from efficient_optim.cli import main as cli_main
from efficient_optim.compress import ControllerPolicy, ErrorFeedback, GradAccumulator, LayerChoice, Quantize
from efficient_optim.compress.budget import TrainingBudget
from efficient_optim.compress.kinds import make_controller
from efficient_optim.compress.learned import (
    DEFAULT_POLICY,
    ENCODED_FEATURES,
    INPUT_SIZE,
    LearnedController,
    PolicyNetwork,
    budget_room,
    encode_features,
    load_policy,
    policy_record,
    round_weights,
    save_policy,
    shipped_policies,
)
from efficient_optim.compress.menu import GRAD_BITS, GRAD_SPECS, KEEP_FRACTIONS, MOMENTUM_SPECS
from efficient_optim.compress.policy_env import EpisodeConfig, run_episode
from efficient_optim.compress.ppo import (
    PPOConfig,
    behaviour_cloning,
    imitation_accuracy,
    imitation_loss,
    ppo_update,
)
from efficient_optim.compress.train_policy import (
    collect_expert,
    expert_factory,
    ppo_batch,
    quick_config,
    train,
)

TINY_EPISODE = EpisodeConfig(steps=12, every=4, widths=(32,), depths=(1,))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Episodes are tiny: one torch thread is faster on a busy machine (and what the training command uses)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def features(layers=4, missing=False):
    out = {}
    for k in range(layers):
        out[k] = {"norm": 0.1 * (k + 1), "norm_std": 0.01, "cos_mg": 0.5, "curvature": -3.0, "progress": 0.25,
                  "depth": k / (layers - 1), "numel": 1000 * (k + 1), "ndim": 2, "lr": 1e-3, "budget_room": 0.5}  # fmt: skip
    if missing:
        out[0].update(norm=float("nan"), cos_mg=None, curvature=float("inf"))
        del out[1]["lr"]
    return out


def net_with_seed(seed=0, hidden=16):
    torch.manual_seed(seed)
    return PolicyNetwork(hidden=hidden)


def test_features_are_encoded_robustly_with_missing_flags():
    x = encode_features(features(missing=True))
    n = len(ENCODED_FEATURES)
    assert x.shape == (4, INPUT_SIZE) and bool(torch.isfinite(x).all())
    names = list(ENCODED_FEATURES)
    for name in ("log_norm", "relative_log_norm", "norm_cv", "cos_mg", "curvature"):
        assert x[0, names.index(name)] == 0 and x[0, n + names.index(name)] == 1
    assert x[1, n + names.index("log_lr")] == 1 and x[1, n + names.index("log_norm")] == 0
    assert x[2, n:].sum() == 0  # nothing missing
    assert x.abs().max() <= 3
    with pytest.raises(ValueError, match="at least one layer"):
        encode_features({})


def test_network_shapes_and_policy_file_round_trip(tmp_path):
    net = net_with_seed()
    x = encode_features(features(layers=5))
    logits, value = net(x)
    assert [tuple(z.shape) for z in logits] == [(5, len(GRAD_BITS)), (5, len(KEEP_FRACTIONS)), (5, len(MOMENTUM_SPECS))]
    assert value.shape == ()
    actions, log_prob, _ = net.act(x)
    assert actions.shape == (5, 3) and float(log_prob) <= 0
    path = save_policy(net, tmp_path / "p.pt", {"note": "test"})
    assert path.stat().st_size < 16_000
    loaded = load_policy(path)
    assert loaded.metadata == {"note": "test"} and loaded.config() == net.config()
    expected, _ = round_weights(net)(x)
    got, _ = loaded(x)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    with pytest.raises(ValueError, match="hidden"):
        PolicyNetwork(hidden=65)
    with pytest.raises(ValueError, match="features"):
        net(torch.zeros(3, INPUT_SIZE + 1))


@pytest.mark.parametrize(
    "change, message",
    [(("version", 99), "version 99"), (("features", ["norm"]), "trained on features"),
     (("menu", {"grad_bits": [8]}), "menu"), (("format", "other"), "not a compression policy file"),
     (("shapes", [[1]]), "do not fit")],
)  # fmt: skip
def test_a_mismatched_policy_file_is_refused_clearly(tmp_path, change, message):
    record = policy_record(net_with_seed())
    record[change[0]] = change[1]
    torch.save(record, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=message):
        load_policy(tmp_path / "bad.pt")


def test_unreadable_or_missing_policy_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable policy file"):
        load_policy(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="no policy file"):
        load_policy(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="PolicyNetwork"):
        LearnedController([torch.nn.Parameter(torch.zeros(3))], policy=3)


def test_behaviour_cloning_reduces_the_imitation_loss():
    make_expert, _ = expert_factory("rules")
    data, _ = collect_expert(make_expert, [0, 1], TINY_EPISODE)
    samples = [s for episode in data for s in episode]
    assert len(samples) == 2 * 3 and all(s[1].shape == (len(s[0]), 3) for s in samples)
    net = net_with_seed()
    with torch.no_grad():
        before = float(imitation_loss(net, samples))
    losses = behaviour_cloning(net, samples, epochs=60)
    with torch.no_grad():
        after = float(imitation_loss(net, samples))
    assert losses[0] == pytest.approx(before) and after < 0.3 * before
    assert imitation_accuracy(net, samples)["all"] > 0.9


def test_ppo_update_is_reproducible_from_a_seed():
    config = quick_config(episode=TINY_EPISODE)
    results = []
    for _ in range(2):
        net = net_with_seed(3)
        start = [p.detach().clone() for p in net.parameters()]
        batch, returns = ppo_batch(net, config, iteration=0)
        assert len(batch) == config.episodes_per_iteration * 3 and all(math.isfinite(r) for r in returns)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        stats = ppo_update(net, optimizer, batch, PPOConfig(), torch.Generator().manual_seed(7))
        assert all(math.isfinite(v) for v in stats.values())
        results.append([p.detach().clone() for p in net.parameters()])
    assert any(not torch.equal(a, b) for a, b in zip(start, results[0]))  # the update moved the weights
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    config = quick_config(episode=TINY_EPISODE, bc_episodes=2, bc_epochs=10, eval_episodes=1)
    whole = train(config, tmp_path / "a.pt", progress=None)
    partial = train(config, tmp_path / "b.pt", progress=None, stop_after=1)
    assert not (tmp_path / "b.pt").exists() and (tmp_path / "b.checkpoint.pt").is_file()
    assert len(partial["ppo"]["iterations"]) == 1
    resumed = train(config, tmp_path / "b.pt", resume=True, progress=None)
    a, b = load_policy(tmp_path / "a.pt"), load_policy(tmp_path / "b.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert resumed["ppo"]["iterations"] == whole["ppo"]["iterations"]
    assert not (tmp_path / "b.checkpoint.pt").exists()  # removed once the policy is written
    assert load_policy(tmp_path / "b_bc.pt").metadata["stage"] == "behaviour cloning only"
    other = quick_config(episode=TINY_EPISODE, bc_episodes=2, bc_epochs=10, eval_episodes=1, seed=5)
    train(config, tmp_path / "c.pt", progress=None, stop_after=0)
    with pytest.raises(ValueError, match="other settings"):
        train(other, tmp_path / "c.pt", resume=True, progress=None)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 96), torch.nn.GELU(), torch.nn.Linear(96, 8))


def test_the_shipped_policy_loads_and_decides_menu_choices():
    assert DEFAULT_POLICY.is_file() and DEFAULT_POLICY.stat().st_size < 16_000
    net = load_policy("default")
    assert net.metadata.get("bc_accuracy") is not None
    assert {"default", "default_bc"} <= set(shipped_policies())
    assert load_policy("default_bc").metadata["stage"] == "behaviour cloning only"
    model = make_model()
    params = list(model.parameters())
    opt = eo.AdamW(params, lr=1e-3, policy=ControllerPolicy())
    ctl = LearnedController(params, policy="default", gradients=ErrorFeedback(Quantize(8)), optimizer=opt, every=2)
    acc = GradAccumulator(params, ctl.gradients, observer=ctl.observe)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        x, y = torch.randn(16, 32, generator=gen), torch.randn(16, 8, generator=gen)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        acc.step(opt)
        got = ctl.step(step, total_steps=5, loss=float(loss.detach()))
        if step % 2 == 0:
            assert set(got) == set(range(len(params)))
            assert all(isinstance(c, LayerChoice) and c.grad in GRAD_SPECS and c.momentum in MOMENTUM_SPECS
                       for c in got.values())  # fmt: skip
    assert [h["step"] for h in ctl.history] == [0, 2, 4]


def test_the_learned_kind_respects_a_budget():
    model = make_model()
    params = list(model.parameters())
    opt = eo.AdamW(params, lr=1e-3, policy=ControllerPolicy())
    budget = TrainingBudget(bytes_per_param=10.5)  # the cheapest choices take 10.1 here (momentum fp32: small layers)
    ctl = make_controller("learned", params, gradients=ErrorFeedback(Quantize(8)), optimizer=opt, budget=budget,
                          every=1)  # fmt: skip
    assert isinstance(ctl, LearnedController) and 0 < budget_room(ctl) < 1
    acc = GradAccumulator(params, ctl.gradients, observer=ctl.observe)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        F.mse_loss(model(torch.randn(16, 32, generator=gen)), torch.randn(16, 8, generator=gen)).backward()
        acc.step(opt)
        ctl.step(step, total_steps=3)
        assert ctl.history[-1]["training_bytes"] <= budget.limit(ctl)
    assert budget_room(LearnedController(params)) == 1.0  # no budget: nothing is constrained


def test_sampling_controller_is_seeded_and_resumable():
    params = [torch.nn.Parameter(torch.randn(64)) for _ in range(3)]
    net = net_with_seed(1)
    picks = []
    for _ in range(2):
        ctl = LearnedController(params, policy=net, deterministic=False, seed=4, record=True)
        for k, p in enumerate(params):
            ctl.observe(k, p.detach())
        picks.append([ctl.decide(ctl.features(0, 10), 0) for _ in range(3)])
        assert len(ctl.trace) == 3 and ctl.trace[0]["actions"].shape == (3, 3)
    assert picks[0] == picks[1]
    state = ctl.state_dict()
    after = ctl.decide(ctl.features(0, 10), 0)
    again = LearnedController(params, policy=net, deterministic=False, seed=0)
    again.load_state_dict(state)
    assert again.decide(again.features(0, 10), 0) == after


def test_an_episode_reports_its_rewards():
    make_expert, _ = expert_factory("rules")
    result = run_episode(make_expert, 0, TINY_EPISODE)
    assert [d["step"] for d in result["decisions"]] == [0, 4, 8]
    for d in result["decisions"]:
        w = TINY_EPISODE.reward
        assert d["reward"] == pytest.approx(-w.alpha * d["loss"] + w.beta * d["memory_saved"] - w.gamma * d["compression_error"])
        assert 0 <= d["compression_error"] < 1 and -1 < d["memory_saved"] < 1
    assert result["return"] == pytest.approx(sum(result["rewards"])) and math.isfinite(result["final_loss"])


def test_train_policy_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "policy.pt"
    assert cli_main(["mango", "train-policy", "--quick", "--out", str(out), "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "behaviour cloning" in text and "ppo 2/2" in text and "wrote" in text
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["command"].startswith("effopt mango train-policy --quick")
    assert 0 <= record["bc"]["accuracy_held_out"]["all"] <= 1 and len(record["ppo"]["iterations"]) == 2
    assert load_policy(out).metadata["seed"] == 1
    assert cli_main(["mango", "train-policy", "--quick", "--out", str(out), "--bc-episodes", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
    assert cli_main(["mango", "nothing"]) == 2
