"""Train the learned compression policy: behaviour cloning on an expert's decisions, then PPO.

``effopt mango train-policy --out PATH`` (``main``) or ``train(TrainConfig(...), out)``:

1. *Expert data*: ``bc_episodes`` episodes (``policy_env.run_episode``) under the expert controller (the budget
   planner, kind ``"planner"`` of ``compress.kinds``; the rule-based Accordion controller with menu choices when
   no planner is available, and the record says which), recording at every decision the encoded features and
   the menu indices of the choices it applied.
2. *Behaviour cloning* (``ppo.behaviour_cloning``) on the first 80 % of those episodes; the imitation accuracy
   on the held-out 20 % is recorded.
3. *PPO* (``ppo.ppo_update``): ``ppo_iterations`` iterations of ``episodes_per_iteration`` episodes sampled from
   the policy, GAE advantages, one update each. A checkpoint (``<out stem>.checkpoint.pt``: weights, Adam state,
   iteration, metrics) is written after behaviour cloning and after every iteration; ``resume=True`` continues
   from it, and gives the same policy as an uninterrupted run (every episode and minibatch order is seeded from
   the seed and the iteration, nothing from the global RNG).
4. *Evaluation*: the expert, the cloned policy and the final policy (deterministic) on the same held-out
   episode seeds: mean return, final held-out loss, memory saved.

Writes the policy (``save_policy``; a few KB) to ``out``, the policy after behaviour cloning alone to
``<out stem>_bc.pt`` (to compare BC only with BC + PPO) and the metrics record to ``out`` with ``.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .controller import AccordionController
from .learned import LearnedController, PolicyNetwork, decision_input, round_weights, save_policy
from .menu import indices_of
from .policy_env import EpisodeConfig, run_episode
from .ppo import (
    IGNORE,
    PPOConfig,
    behaviour_cloning,
    gae,
    group_advantages,
    imitation_accuracy,
    imitation_loss,
    ppo_update,
)

CHECKPOINT_VERSION = 1
EVAL_SEED_BASE = 900_000  # held-out episode seeds, the same for every training seed


@dataclass(frozen=True)
class TrainConfig:
    """How a policy is trained.

    Args:
        seed: seeds the network, every episode and every minibatch order (default 0).
        bc_episodes: expert episodes for behaviour cloning (default 24).
        bc_epochs: behaviour cloning's full-batch steps (default 300).
        ppo_iterations: PPO iterations (default 20).
        episodes_per_iteration: episodes sampled per PPO iteration (default 8).
        samples_per_seed: episodes sampled on each environment seed, a group (default 4; ``ppo`` module doc).
        eval_episodes: held-out episodes each evaluation runs (default 12).
        hidden: the LSTM's hidden size (default 16).
        expert: the controller kind cloned (default ``"planner"``; ``"rules"``: Accordion).
        episode: the episodes' settings (default ``EpisodeConfig()``).
        ppo: PPO's settings (default ``PPOConfig()``).
    """

    seed: int = 0
    bc_episodes: int = 24
    bc_epochs: int = 300
    ppo_iterations: int = 20
    episodes_per_iteration: int = 8
    samples_per_seed: int = 4
    eval_episodes: int = 12
    hidden: int = 16
    expert: str = "planner"
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def __post_init__(self):
        for name in ("bc_episodes", "bc_epochs", "ppo_iterations", "episodes_per_iteration", "samples_per_seed",
                     "eval_episodes", "hidden"):  # fmt: skip
            value, low = getattr(self, name), 0 if name == "ppo_iterations" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["episode"]["reward"] = asdict(self.episode.reward)
        return out


def quick_config(**overrides) -> TrainConfig:
    """A seconds-long configuration (for tests and ``--quick``): 3 expert episodes, 2 PPO iterations, short
    episodes."""
    base = TrainConfig(bc_episodes=3, bc_epochs=30, ppo_iterations=2, episodes_per_iteration=2, samples_per_seed=2,
                       eval_episodes=2,
                       episode=EpisodeConfig(steps=16, every=4, widths=(48,), depths=(1,)))  # fmt: skip
    return replace(base, **overrides)


def expert_factory(kind: str):
    """``(make_controller, kind used)``: the controller kind cloned, or Accordion when no planner exists."""
    try:
        from .kinds import CONTROLLER_KINDS, make_controller
    except ImportError:
        CONTROLLER_KINDS, make_controller = (), None
    if make_controller is not None and kind in CONTROLLER_KINDS and kind != "learned":
        return (lambda params, **kw: make_controller(kind, params, **kw)), kind
    if kind not in ("planner", "rules"):
        raise ValueError(f"expert must be 'planner' or 'rules', got {kind!r}")
    from .menu import choice_from_indices

    low, high = choice_from_indices(0, 2, 0), choice_from_indices(2, 2, 1)  # q2 + 4bit; q8 + 8bit
    return (lambda params, **kw: AccordionController(params, low=low, high=high, **kw)), "rules (Accordion)"


def _labels(choice) -> list[int]:
    out = [IGNORE, IGNORE, IGNORE]
    try:
        out = list(indices_of(choice))
    except ValueError:
        pass
    return out


def collect_expert(make_expert, seeds, episode: EpisodeConfig) -> tuple[list[list], list[dict]]:
    """Per episode, the ``(obs, labels)`` of every decision of the expert; and each episode's summary."""
    data, summaries = [], []
    for seed in seeds:
        samples: list = []

        def factory(params, samples=samples, **kw):
            ctl = make_expert(params, **kw)
            decide = ctl.decide

            def recorded(features, step):
                samples.append([decision_input(ctl, features), None])
                return decide(features, step)

            ctl.decide = recorded
            return ctl

        result = run_episode(factory, seed, episode)
        current: dict = {}  # what each layer has after each decision (a decision may leave a layer unchanged)
        for sample, decision in zip(samples, result["controller"].history):
            for k, (grad, momentum) in decision["choices"].items():
                old = current.get(int(k), (None, None))
                current[int(k)] = (grad or old[0], momentum or old[1])
            sample[1] = torch.tensor([_labels(_choice(current.get(k))) for k in range(len(sample[0]))])
        data.append([tuple(s) for s in samples])
        summaries.append(_summary(result))
    return data, summaries


def _choice(pair):
    from .choice import LayerChoice

    return LayerChoice() if pair is None else LayerChoice(*pair)


def _summary(result: dict) -> dict:
    return {"return": result["return"], "final_loss": result["final_loss"], "memory_saved": result["memory_saved"]}


def evaluate(make_controller, config: TrainConfig) -> dict:
    """Mean return, final held-out loss and memory saved over the held-out episodes, and each one's return."""
    runs = [_summary(run_episode(make_controller, EVAL_SEED_BASE + i, config.episode)) for i in range(config.eval_episodes)]
    return {**{key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}, "returns": [r["return"] for r in runs]}


def learned_factory(net: PolicyNetwork, deterministic: bool = True, seed: int = 0, record: bool = False):
    return lambda params, **kw: LearnedController(params, policy=net, deterministic=deterministic, seed=seed,
                                                  record=record, **kw)  # fmt: skip


def ppo_batch(net: PolicyNetwork, config: TrainConfig, iteration: int) -> tuple[list[dict], list[float]]:
    """The decisions of one iteration's sampled episodes with their advantages; and the episodes' returns.

    The episodes come in groups of ``samples_per_seed`` on one environment seed each (the policy's sampling
    seed differs); ``config.ppo.advantage`` says how advantages are formed (``ppo`` module doc)."""
    batch, returns = [], []
    for e in range(0, config.episodes_per_iteration, config.samples_per_seed):
        env_seed = 100_000 * config.seed + 10_000 + 100 * iteration + e
        size = min(config.samples_per_seed, config.episodes_per_iteration - e)
        results = [run_episode(learned_factory(net, False, env_seed + 50_000 * (i + 1), record=True), env_seed,
                               config.episode) for i in range(size)]  # fmt: skip
        if config.ppo.advantage == "group":
            advs, rets = group_advantages([r["rewards"] for r in results], config.ppo.gamma)
        else:
            pairs = [gae(r["rewards"], [t["value"] for t in r["controller"].trace], config.ppo.gamma,
                         config.ppo.gae_lambda) for r in results]  # fmt: skip
            advs, rets = [p[0] for p in pairs], [p[1] for p in pairs]
        for result, adv, ret in zip(results, advs, rets):
            batch += [{**t, "advantage": a, "return": r} for t, a, r in zip(result["controller"].trace, adv, ret)]
            returns.append(result["return"])
    return batch, returns


def bc_policy_path(out: Path) -> Path:
    """Where the policy after behaviour cloning alone is written (``<out stem>_bc.pt``)."""
    return out.with_name(out.stem + "_bc.pt")


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.stem + ".checkpoint.pt")


def _save_checkpoint(out, config, net, optimizer, stage, iteration, metrics):
    torch.save({"version": CHECKPOINT_VERSION, "config": json.dumps(config.to_dict(), sort_keys=True), "stage": stage,
                "iteration": iteration, "net": net.state_dict(), "optimizer": optimizer.state_dict(),
                "metrics": json.dumps(metrics)}, checkpoint_path(out))  # fmt: skip


def _load_checkpoint(out: Path, config: TrainConfig) -> dict | None:
    path = checkpoint_path(out)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')!r}, expected {CHECKPOINT_VERSION}")
    if state["config"] != json.dumps(config.to_dict(), sort_keys=True):
        raise ValueError(f"{path} was written with other settings; resume with the same options or remove it")
    state["metrics"] = json.loads(state["metrics"])
    return state


def _say(progress, text: str) -> None:
    if progress is not None:
        progress(text)


def train(config: TrainConfig, out, resume: bool = False, progress=print, stop_after: int | None = None) -> dict:
    """Behaviour cloning then PPO (module doc); the metrics record (also written to ``out`` with ``.json``).

    Args:
        config: the training settings.
        out: where the policy is written (its checkpoint and record beside it).
        resume: continue from ``out``'s checkpoint when there is one (default False: start afresh).
        progress: called with one line of text per stage and iteration (default ``print``; None: silent).
        stop_after: stop (checkpointed, no policy written) after this many PPO iterations (default None:
            train to the end); what an interrupted run leaves.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = PolicyNetwork(hidden=config.hidden)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.ppo.lr)
    state = _load_checkpoint(out, config) if resume else None
    if state is None:
        metrics = _behaviour_cloning_stage(net, config, progress)
        round_weights(net)  # as a policy file holds it
        save_policy(net, bc_policy_path(out), {"stage": "behaviour cloning only", "seed": config.seed,
                                               "bc_accuracy": metrics["bc"]["accuracy_held_out"]["all"]})  # fmt: skip
        metrics["ppo"] = {"iterations": [], "eval_before": evaluate(learned_factory(net), config)}
        _say(progress, f"cloned policy: mean return {metrics['ppo']['eval_before']['return']:.3f} on the held-out episodes")
        metrics["seconds"] = time.perf_counter() - started
        _save_checkpoint(out, config, net, optimizer, "ppo", 0, metrics)
        start = 0
    else:
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        metrics, start = state["metrics"], state["iteration"]
        started -= metrics.get("seconds", 0.0)  # the seconds spent before the interruption count too
        _say(progress, f"resumed from {checkpoint_path(out)} at PPO iteration {start}")
    for it in range(start, config.ppo_iterations):
        if stop_after is not None and it >= stop_after:
            return metrics
        batch, returns = ppo_batch(net, config, it)
        stats = ppo_update(net, optimizer, batch, config.ppo, torch.Generator().manual_seed(1000 * config.seed + it))
        metrics["ppo"]["iterations"].append({"mean_return": sum(returns) / len(returns), **stats})
        _say(progress, f"ppo {it + 1}/{config.ppo_iterations}: mean sampled return {sum(returns) / len(returns):.3f}, "
                       f"policy loss {stats['policy_loss']:.4f}, value loss {stats['value_loss']:.4f}, "
                       f"entropy {stats['entropy']:.3f}")  # fmt: skip
        metrics["seconds"] = time.perf_counter() - started
        _save_checkpoint(out, config, net, optimizer, "ppo", it + 1, metrics)
    round_weights(net)  # what the policy file holds: the evaluation is of the shipped weights
    metrics["ppo"]["eval_after"] = evaluate(learned_factory(net), config)
    metrics["seconds"] = time.perf_counter() - started
    metrics["config"] = config.to_dict()
    _say(progress, f"trained policy: mean return {metrics['ppo']['eval_after']['return']:.3f} on the held-out episodes")
    summary = {"bc_accuracy": metrics["bc"]["accuracy_held_out"]["all"], "expert": metrics["bc"]["expert"],
               "eval_return_bc": metrics["ppo"]["eval_before"]["return"],
               "eval_return_ppo": metrics["ppo"]["eval_after"]["return"], "seed": config.seed}  # fmt: skip
    save_policy(net, out, summary)
    out.with_suffix(".json").write_text(json.dumps(metrics, indent=1) + "\n")
    checkpoint_path(out).unlink(missing_ok=True)
    return metrics


def _behaviour_cloning_stage(net, config: TrainConfig, progress) -> dict:
    make_expert, expert = expert_factory(config.expert)
    seeds = [100_000 * config.seed + i for i in range(config.bc_episodes)]
    _say(progress, f"expert data: {len(seeds)} episodes of the {expert} controller")
    data, _ = collect_expert(make_expert, seeds, config.episode)
    held = max(1, len(data) // 5) if len(data) > 1 else 0
    train_set = [s for episode in data[:len(data) - held] for s in episode]
    held_set = [s for episode in data[len(data) - held:] for s in episode] or train_set
    with torch.no_grad():
        before = float(imitation_loss(net, train_set))
    losses = behaviour_cloning(net, train_set, epochs=config.bc_epochs,
                               progress=lambda e, loss: _say(progress, f"bc step {e}: imitation loss {loss:.4f}"))  # fmt: skip
    with torch.no_grad():
        after = float(imitation_loss(net, train_set))
    metrics = {"expert": expert, "episodes": len(data), "held_out_episodes": held, "decisions": len(train_set),
               "imitation_loss_before": before, "imitation_loss_after": after, "loss_curve": losses[::10],
               "accuracy_train": imitation_accuracy(net, train_set),
               "accuracy_held_out": imitation_accuracy(net, held_set),
               "expert_eval": evaluate(make_expert, config)}  # fmt: skip
    _say(progress, f"behaviour cloning: imitation loss {before:.4f} -> {after:.4f}, held-out accuracy "
                   f"{metrics['accuracy_held_out']['all']:.3f}; expert mean return {metrics['expert_eval']['return']:.3f}")  # fmt: skip
    return {"bc": metrics}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="effopt mango train-policy",
                                 description="Train the learned compression policy (an LSTM over the layers choosing "
                                             "gradient bits, kept fraction and momentum storage): behaviour cloning on "
                                             "the budget planner's decisions, then PPO, on episodes that train a tiny "
                                             "character-level language model.")  # fmt: skip
    ap.add_argument("--out", type=Path, required=True, help="the policy file to write (its .json metrics record, the "
                    "behaviour-cloning-only policy _bc.pt and, while training, a .checkpoint.pt are written beside it)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="seeds the network, the episodes and PPO (default 0)")
    ap.add_argument("--bc-episodes", type=int, default=None, help="expert episodes for behaviour cloning (default 24; quick 3)")
    ap.add_argument("--ppo-iterations", type=int, default=None, help="PPO iterations (default 20; quick 2)")
    ap.add_argument("--episodes-per-iteration", type=int, default=None, help="episodes per PPO iteration (default 8; quick 2)")
    ap.add_argument("--expert", choices=("planner", "rules"), default="planner", help="the controller cloned (default planner)")
    ap.add_argument("--quick", action="store_true", help="a seconds-long run with short episodes (a smoke test)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out, if there is one")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: reproducible results)")
    return ap


def config_from_args(args) -> TrainConfig:
    config = quick_config() if args.quick else TrainConfig()
    changes = {"seed": args.seed, "expert": args.expert}
    for name in ("bc_episodes", "ppo_iterations", "episodes_per_iteration"):
        value = getattr(args, name)
        if value is not None:
            if value < (0 if name == "ppo_iterations" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'ppo_iterations' else 1}, got {value}")
            changes[name] = value
    if "episodes_per_iteration" in changes:
        changes["samples_per_seed"] = min(config.samples_per_seed, changes["episodes_per_iteration"])
    return replace(config, **changes)


def main(argv=None) -> int:
    """``effopt mango train-policy``: exit code 0, or 2 for bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(f"effopt mango train-policy -> {args.out}", flush=True)
    metrics = train(config, args.out, resume=args.resume, progress=lambda line: print(line, flush=True))
    metrics["command"] = "effopt mango train-policy " + shlex.join(argv)
    args.out.with_suffix(".json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) and {args.out.with_suffix('.json')} "
          f"({metrics['seconds']:.0f} s)")  # fmt: skip
    return 0
