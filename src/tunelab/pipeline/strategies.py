"""Strategies against forgetting, as rewrites of a pipeline's stage list (`conf/strategy/`, `strategy=<name>`).

Each strategy is a function `(stages, **settings) -> stages` over `Stage`s whose overrides are ordinary
`tunelab train` overrides; it adds overrides (a mixture dataset, an adapter method) and never trains
anything itself, so every strategy's stages are composed and validated like any run before the first trains.
Mixtures reuse the datamodule's own machinery: a dataset with `tasks` and `weights`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from tunelab.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    """One stage: its name, its `train` overrides, and (after a first composition) the dataset it trains on.

    `dataset` is the option its `dataset` group chose, `train_rows` that dataset's training examples, and
    `tasks` the evaluation tasks it introduces (its dataset's name, or a mixture's task names).
    """

    name: str
    overrides: tuple[str, ...]
    dataset: str | None = None
    train_rows: int | None = None
    tasks: tuple[str, ...] = field(default_factory=tuple)
    mixture: bool = False
    max_steps: int = -1  # the stage's hyperparams.max_steps (-1: epochs decide)


def _single_task(stage: Stage, strategy: str) -> str:
    if stage.mixture or not stage.dataset:
        raise ConfigError(f"strategy={strategy} needs each stage to train one dataset option, but stage "
                          f"{stage.name!r} trains a mixture", f"pipeline.stages.{stage.name}",
                          "give each stage a single-task dataset (dataset=<option>); the strategy builds the mixtures")
    return stage.dataset


def _mixture(tasks: Mapping[str, float], samples: int | None) -> list[str]:
    """Overrides turning the stage's dataset into a mixture of dataset options with sampling weights."""
    overrides = [f"+dataset@dataset.tasks.{name}={name}" for name in tasks]
    weights = ",".join(f"{name}:{weight:.6g}" for name, weight in tasks.items())
    overrides.append(f"+dataset.weights={{{weights}}}")
    if samples:
        overrides.append(f"+dataset.samples_per_epoch={samples}")
    return overrides


def sequential(stages: Sequence[Stage]) -> list[Stage]:
    """Plain sequential fine-tuning: each stage trains on its own data only."""
    return list(stages)


def replay(stages: Sequence[Stage], fraction: float = 0.2, same_budget: bool = True) -> list[Stage]:
    """Experience replay: stage i>0 draws `fraction` of its training examples from the earlier stages' training
    data (split evenly between them) and the rest from its own; with `same_budget`, as many examples per epoch
    as its own data holds, so it costs what the sequential stage costs."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"strategy.fraction={fraction} is not in (0, 1)", "key strategy.fraction",
                          "the share of each later stage's examples drawn from earlier stages, e.g. 0.2")
    out: list[Stage] = []
    for i, stage in enumerate(stages):
        own = _single_task(stage, "replay")
        if i == 0:
            out.append(stage)
            continue
        earlier = list(dict.fromkeys(_single_task(s, "replay") for s in stages[:i] if s.dataset != own))
        if not earlier:
            out.append(stage)
            continue
        weights = {own: 1.0 - fraction, **{name: fraction / len(earlier) for name in earlier}}
        samples = stage.train_rows if same_budget else None
        out.append(replace(stage, overrides=(*stage.overrides, *_mixture(weights, samples))))
    return out


def multitask(stages: Sequence[Stage], weights: Mapping[str, float] | None = None) -> list[Stage]:
    """One stage over the union of every stage's data (the article's alternative to a chain), weighted by
    `weights` (dataset option -> weight; null = in proportion to each dataset's size), drawing as many
    examples per epoch as all stages together (and, when the stages are budgeted in steps, the sum of their
    max_steps), so the budget matches the chain's. The first stage's other overrides (hyperparameters) apply."""
    names = [_single_task(s, "multitask") for s in stages]
    sizes = {s.dataset: s.train_rows or 1 for s in stages}
    unknown = sorted(set(weights or {}) - set(names))
    if unknown:
        raise ConfigError(f"strategy.weights names {unknown[0]!r}, which no stage trains", "key strategy.weights",
                          f"the stages train: {', '.join(names)}")
    chosen = {n: float((weights or {}).get(n, sizes[n] if not weights else 0.0)) for n in dict.fromkeys(names)}
    total = sum(chosen.values()) or 1.0
    samples = sum(s.train_rows or 0 for s in stages) or None
    first = stages[0]
    tasks = tuple(t for s in stages for t in s.tasks)
    budgeted = all(s.max_steps > 0 for s in stages)
    steps = [f"hyperparams.max_steps={sum(s.max_steps for s in stages)}"] if budgeted else []
    overrides = (*first.overrides, *_mixture({n: w / total for n, w in chosen.items()}, samples), *steps)
    return [replace(first, name="multitask", overrides=overrides, tasks=tuple(dict.fromkeys(tasks)))]


def adapters(stages: Sequence[Stage], method: str = "lora", from_stage: int = 1) -> list[Stage]:
    """Stages from index `from_stage` on train an adapter (`method=<option>`, the base frozen); earlier ones keep
    their own method. With a random-init base (model=tiny) the first stage must train every weight for there to
    be anything to protect, hence the default 1; with a pretrained base use 0."""
    if from_stage < 0:
        raise ConfigError(f"strategy.from_stage={from_stage} is negative", "key strategy.from_stage",
                          "0 (every stage an adapter) or the index of the first adapter stage")
    return [replace(s, overrides=(*s.overrides, f"method={method}")) if i >= from_stage else s
            for i, s in enumerate(stages)]
