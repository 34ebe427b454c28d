"""`tunelab compare run=<dir> dataset=<option> documents=<option> base_model=<option>`: should I fine-tune?

Prompting, retrieval and fine-tuning scored side by side, with what each costs in context window.

Each arm is one `tunelab eval` (the same composed eval config, the same scoring path) on the same test split:
by default the base model zero-shot, one-shot, few-shot and with retrieval, the fine-tuned run, and the
fine-tuned run with retrieval. `dataset=`, `documents=` and `logger=` are the groups every verb names (each arm
gets the option chosen here, and any `dataset.<key>=` set here); `base_model=` is the model option of the base
arms (a run brings its own model). The former spellings `data=`, `docs=`, `tracker=`, `base=` still work (the
CLI renames them, cli.Verb.renamed). The comparison directory holds each arm's eval directory, and:

    compare.md / compare.csv   the headline metric with its 95% CI per arm, tokens per answer (prompt, and prompt
                               plus answer), the other metrics, retrieval hit rate, latency per answer, trainable
                               parameters, training time
    compare.png                a bar chart of the headline metric with CI whiskers, every bar labelled (a zero too)
    before_after.png           with `before=<an earlier comparison's dir>` (e.g. before a fact update): per arm, the
                               metric on the changed facts (the `=True` slice both hold, else the headline) before
                               and after, side by side in one chart
    reading.txt                one paragraph read off the table (also at the end of compare.md)

Every run directory and every arm's config is checked before any arm is scored (the CLI's pre-flight calls
`preflight`), and the arms compose with the command's own `--config-dir` and search path.
Every arm's W&B run (job_type=eval) is in one W&B group, the comparison's id.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from tunelab.checkpoint.rundir import find_run
from tunelab.config.compose import SearchPath
from tunelab.errors import ConfigError, TunelabError
from tunelab.job import RunContext, verb

log = logging.getLogger(__name__)
# The retriever's own figures against the gold passage (`tunelab eval` with documents that name it), with CIs.
RETRIEVAL_FIGURES = ("retrieval_recall@1", "retrieval_recall@5", "retrieval_mrr")

SHARED_GROUPS = ("dataset", "documents", "logger")  # chosen once on compare's command line, the same in every arm


# ---- the arms -------------------------------------------------------------------------------------------
def shared_overrides(cfg: DictConfig, run: RunContext | None = None, seed: bool = True) -> list[str]:
    """The eval overrides every arm shares: the base model, the groups' options (and keys set under them on the
    command line), the W&B group, and the run's seed (`seed=False`: not read, for the pre-flight)."""
    hydra = OmegaConf.select(cfg, "hydra", default=None)
    choices = dict(run.choices) if run is not None and run.choices else dict(
        OmegaConf.select(hydra, "runtime.choices", default={}) if hydra is not None else {})
    typed = list(run.overrides) if run is not None and run.overrides else list(
        OmegaConf.select(hydra, "overrides.task", default=[]) if hydra is not None else [])
    nested = [o for o in typed if re.match(rf"[+~]*({'|'.join(SHARED_GROUPS)})[./]", o)]  # dataset.x=, dataset/format=
    shared = [f"model={cfg.base_model}", *(f"{g}={choices[g]}" for g in SHARED_GROUPS if choices.get(g)), *nested,
              f"group={cfg.group}"]
    if seed and cfg.run is not None:  # every arm draws the run's templates (its seed), so all score the same prompts
        from tunelab.verbs.eval import read_run_settings

        value = read_run_settings(Path(str(cfg.run))).get("seed") if Path(str(cfg.run)).is_dir() else None
        shared += [f"seed={value}"] if value is not None else []
    return shared


def arm_overrides(cfg: DictConfig, arm: Mapping[str, Any], shared: Sequence[str]) -> list[str]:
    """The `tunelab eval` overrides of one arm: the shared choices, the run if the arm uses it, its own."""
    run = [f"run={cfg.run}"] if arm.get("run") else []
    return [*shared, *run, *cfg.overrides, *arm.get("overrides", [])]


def arm_configs(cfg: DictConfig, out_dir: Path, shared: Sequence[str], run: RunContext | None = None
                ) -> dict[str, DictConfig]:
    """Every arm's composed and validated eval config, before any arm runs (a typo fails at once), composed with
    the command's config dir and search path (a user's own dataset or documents option is found)."""
    from tunelab.config.validate import validate

    search = SearchPath.of(cfg, run)
    configs: dict[str, DictConfig] = {}
    for name, arm in cfg.arms.items():
        if arm.get("run") and cfg.run is None:  # skipped (the verb says so)
            continue
        overrides = [*arm_overrides(cfg, arm, shared), f"paths.output_dir={cfg.paths.output_dir}"]  # shared cache
        try:
            eval_cfg = search.compose(overrides, "eval")
            with open_dict(eval_cfg):
                eval_cfg.paths.run_dir = str(out_dir / str(name))
            validate(eval_cfg, launch=True)  # and the local data and model paths it reads (a DataError: exit 3)
        except TunelabError as err:
            raise _arm_error(err, str(name)) from None
        configs[str(name)] = eval_cfg
    if not configs:
        raise ConfigError("no arm to run", "key arms", "give run=<run dir> for the fine-tuned arms, or base arms")
    return configs


def _arm_error(err: TunelabError, name: str) -> TunelabError:
    """An arm's config error, naming the arm, and compare's key where the arm's override came from compare's."""
    where = re.sub(r"override model=(\S+) on the command line", r"key base_model (\1)", err.where)
    return type(err)(f"compare arm {name!r}: {err.what}", where, err.hint)


def preflight(cfg: DictConfig) -> None:
    """The CLI's pre-flight for `tunelab compare`: the run directory (a local one; a W&B reference is resolved
    when the verb starts), every arm's config and the headline metric, in seconds, before any arm is scored."""
    if cfg.run is not None:
        find_run(str(cfg.run), download=False)
    before_table(cfg, headline(cfg, arm_configs(cfg, Path(str(cfg.paths.output_dir)) / "compare" / "<id>",
                                                shared_overrides(cfg, seed=False))))


def run_arms(cfg: DictConfig, run: RunContext, configs: Mapping[str, DictConfig], shared: Sequence[str]
             ) -> dict[str, dict[str, float]]:
    """Evaluate every arm into `<out>/<arm>/`; arm -> metrics."""
    from tunelab.verbs.eval import evaluate_cfg

    results: dict[str, dict[str, float]] = {}
    for name, eval_cfg in configs.items():
        overrides = arm_overrides(cfg, cfg.arms[name], shared)
        log.info("arm %s: tunelab eval %s", name, " ".join(overrides))
        # Each arm its own job: its own directory and a W&B id unique across comparisons.
        arm = RunContext.local(eval_cfg.paths.run_dir, run_id=f"{run.run_id}-{name}", overrides=tuple(overrides))
        results[name] = evaluate_cfg(eval_cfg, arm)
        (arm.run_dir / "overrides.json").write_text(json.dumps(overrides) + "\n")
    return results


def headline(cfg: DictConfig, configs: Mapping[str, DictConfig]) -> str:
    """The metric of the table and chart: `metric`, or the dataset's first; checked before any arm runs."""
    dataset = next(iter(configs.values())).dataset
    tasks = dataset.get("tasks") or {"": dataset}
    names = [str(n) for task in tasks.values() for part in ("metrics", "corpus_metrics") for n in task.get(part) or {}]
    metric = cfg.metric or (names[0] if names else None)
    if metric not in names:
        raise ConfigError(f"metric {metric!r} is not a metric of dataset {dataset.get('name')}", "key metric",
                          f"one of: {', '.join(names)}" if names else "give the dataset a metrics: entry")
    return str(metric)


# ---- the table -----------------------------------------------------------------------------------------
def _metric_names(metrics: Mapping[str, float], split: str) -> list[str]:
    """Top-level metric names with a CI (`<split>/<name>/ci_low` exists), in their order of appearance."""
    names = []
    for key in metrics:
        if key.startswith(f"{split}/") and key.endswith("/ci_low"):
            name = key[len(split) + 1:-len("/ci_low")]
            if "/" not in name and not name.startswith("retrieval_"):
                names.append(name)
    return sorted(names)


def _slices(metrics: Mapping[str, float], split: str, metric: str) -> list[str]:
    """Slice prefixes (`changed=True`, ...) that hold the headline metric."""
    return sorted({k[len(split) + 1:].rsplit("/", 1)[0] for k in metrics
                   if k.startswith(f"{split}/") and "=" in k and k.endswith(f"/{metric}")})


def table_rows(results: Mapping[str, Mapping[str, float]], metric: str, split: str = "test") -> list[dict[str, Any]]:
    """One row per arm: the headline metric and its CI, the other metrics, slices, cost."""
    rows = []
    for arm, m in results.items():
        row: dict[str, Any] = {"arm": arm, metric: m.get(f"{split}/{metric}"),
                               f"{metric}_ci_low": m.get(f"{split}/{metric}/ci_low"),
                               f"{metric}_ci_high": m.get(f"{split}/{metric}/ci_high"), **token_cost(m, split)}
        for name in _metric_names(m, split):
            if name != metric:
                row[name] = m[f"{split}/{name}"]
        for part in _slices(m, split, metric):
            row[f"{metric} ({part})"] = m[f"{split}/{part}/{metric}"]
            row[f"{metric} ({part})_ci_low"] = m[f"{split}/{part}/{metric}/ci_low"]
            row[f"{metric} ({part})_ci_high"] = m[f"{split}/{part}/{metric}/ci_high"]
        row["retrieval_hit"] = m.get(f"{split}/retrieval_hit")
        for name in RETRIEVAL_FIGURES:  # in every row (None where an arm retrieves nothing): one set of columns
            for suffix, key in (("", ""), ("_ci_low", "/ci_low"), ("_ci_high", "/ci_high")):
                row[f"{name}{suffix}"] = m.get(f"{split}/{name}{key}")
        row["latency_ms"] = 1000 * m[f"{split}/latency_s"] if f"{split}/latency_s" in m else None
        row["trainable_params"] = m.get("params/trainable")
        row["train_s"] = m.get("perf/train_s")
        row["n"] = m.get(f"{split}/n")
        rows.append(row)
    return rows


def token_cost(metrics: Mapping[str, float], split: str = "test") -> dict[str, float | None]:
    """What one answer costs in context window, per arm: its prompt's tokens and the prompt's plus the answer's
    (means over the split; None where the eval did not record them, e.g. answer tokens before they were)."""
    prompt, answer = metrics.get(f"{split}/prompt_tokens"), metrics.get(f"{split}/answer_tokens")
    return {"prompt_tokens": prompt, "total_tokens": prompt + answer if None not in (prompt, answer) else None}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 100:
        return f"{int(value):,}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    """The table as GitHub markdown: CI columns folded into `value [low, high]`."""
    keys = [k for k in rows[0] if not k.endswith(("_ci_low", "_ci_high"))]
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    header = [f"{k} [95% CI]" if f"{k}_ci_low" in rows[0] else k for k in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if k == "arm" else "---:" for k in keys) + "|"]
    for row in rows:
        cells = []
        for key in keys:
            cell = _fmt(row.get(key), 1 if key in ("prompt_tokens", "total_tokens", "latency_ms", "train_s") else 3)
            if f"{key}_ci_low" in row and row.get(key) is not None:
                cell += f" [{_fmt(row[f'{key}_ci_low'])}, {_fmt(row[f'{key}_ci_high'])}]"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _series(rows: Sequence[Mapping[str, Any]], metric: str) -> list[str]:
    """The headline metric, then each slice of it (`exact_match (changed=True)`, ...)."""
    return [metric] + [k for k in rows[0] if k.startswith(f"{metric} (") and not k.endswith(("_low", "_high"))]


def _grouped_bars(ax: Any, groups: Sequence[str], series: Sequence[tuple[str, Sequence[Mapping[str, Any]], str]],
                  metric: str) -> None:
    """Bars per group (arm), one per series side by side, 95% CI whiskers where the rows hold them, a value label
    on every bar (zeros as a visible mark at 0, a missing value as n/a). `series`: (label, rows by group, key)."""
    from tunelab.charts import label_bars

    width = 0.8 / len(series)
    bars = []
    for s, (label, rows, key) in enumerate(series):
        xs = [i + (s - (len(series) - 1) / 2) * width for i in range(len(groups))]
        values = [r.get(key) if r else None for r in rows]
        lows = [r.get(f"{key}_ci_low") if r else None for r in rows]
        highs = [r.get(f"{key}_ci_high") if r else None for r in rows]
        drawn = [v if v is not None else 0.0 for v in values]
        errors = [[max(v - lo, 0) if lo is not None else 0 for v, lo in zip(drawn, lows, strict=True)],
                  [max(hi - v, 0) if hi is not None else 0 for v, hi in zip(drawn, highs, strict=True)]]
        container = ax.bar(xs, drawn, width, yerr=errors, capsize=3, label=label)
        bars.append((xs, values, highs, container.patches[0].get_facecolor()))
    ends = [e for _, values, highs, _ in bars for pair in zip(values, highs, strict=True) for e in pair if e]
    top = max([1.0, *ends])
    ax.set_ylim(-0.012 * top, 1.12 * top)  # room for the labels above the tallest whisker; a zero mark above the axis
    for xs, values, highs, colour in bars:
        label_bars(ax, xs, values, [h if h is not None else v for v, h in zip(values, highs, strict=True)], width,
                   colour, fontsize=7 if len(series) < 4 else 6)
    ax.set_xticks(range(len(groups)), [str(g).replace("_", "\n") for g in groups], fontsize=8)
    ax.set_ylabel(metric)
    if len(series) > 1:
        ax.legend(fontsize=7, loc="upper left")


def chart_figure(rows: Sequence[Mapping[str, Any]], metric: str, title: str) -> Any:
    """Bars of the headline metric per arm with 95% CI whiskers (and per slice, side by side), each labelled."""
    from tunelab.charts import fit_title, pyplot

    series = _series(rows, metric)
    fig, ax = pyplot().subplots(figsize=(1.6 + 1.5 * len(rows), 3.6), layout="constrained")
    _grouped_bars(ax, [str(r["arm"]) for r in rows], [(key, rows, key) for key in series], metric)
    fit_title(fig, fig.suptitle(title, fontsize=9))  # centred on the figure, so it wraps to the full width
    return fig


def chart(rows: Sequence[Mapping[str, Any]], metric: str, title: str, path: Path) -> None:
    """compare.png: `chart_figure` written to `path`."""
    from tunelab.charts import pyplot

    fig = chart_figure(rows, metric, title)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def before_after_key(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]], metric: str) -> str:
    """What a before/after chart compares: the headline metric on the facts that changed (the `=True` slice both
    tables hold, e.g. `exact_match (changed=True)`), else the headline metric itself."""
    common = set(before[0]) & set(after[0])
    return next((k for k in _series(after, metric)[1:] if k.endswith("=True)") and k in common), metric)


def before_after_figure(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]], metric: str,
                        title: str) -> Any:
    """One chart of two comparisons (e.g. before and after a fact update): per arm, the `before_after_key` figure
    before and after side by side with their CIs; arms in either table, in the after table's order."""
    from tunelab.charts import fit_title, pyplot

    key = before_after_key(before, after, metric)
    by_before, by_after = {r["arm"]: r for r in before}, {r["arm"]: r for r in after}
    arms = [*by_after, *(a for a in by_before if a not in by_after)]
    fig, ax = pyplot().subplots(figsize=(1.6 + 1.3 * len(arms), 3.6), layout="constrained")
    _grouped_bars(ax, arms, [("before", [by_before.get(a) for a in arms], key),
                             ("after", [by_after.get(a) for a in arms], key)], key)
    fit_title(fig, fig.suptitle(title, fontsize=9))  # centred on the figure, so it wraps to the full width
    return fig


def before_table(cfg: DictConfig, metric: str) -> list[dict[str, Any]] | None:
    """The table of the comparison named by `before=` (None without one), checked before any arm is scored."""
    if cfg.get("before") is None:
        return None
    where = Path(str(cfg.before))
    hint = "give the directory of an earlier `tunelab compare` (outputs/compare/<id>), e.g. one before a fact update"
    if not (where / "compare.csv").is_file():
        raise ConfigError(f"no compare.csv in {where}", "key before", hint)
    rows = read_table(where)
    if not rows or metric not in rows[0]:
        raise ConfigError(f"{where}/compare.csv holds no {metric!r} column", "key before",
                          "compare the same metric in both: metric=<name>")
    return rows


def before_after_chart(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]], metric: str,
                       title: str, path: Path) -> None:
    """before_after.png: `before_after_figure` written to `path`."""
    from tunelab.charts import pyplot

    fig = before_after_figure(before, after, metric, title)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def read_table(compare_dir: Path) -> list[dict[str, Any]]:
    """A comparison's compare.csv back as table rows (numbers as floats, empty cells as None)."""
    with (compare_dir / "compare.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{k: (v if k == "arm" else float(v) if v not in ("", None) else None) for k, v in row.items()}
            for row in rows]


def reading(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    """One plain paragraph read off the table: who wins, by how much, whether the CIs separate, at what cost."""
    by_arm = {r["arm"]: r for r in rows if r.get(metric) is not None}
    best = max(by_arm.values(), key=lambda r: r[metric])

    def ci(r: Mapping[str, Any]) -> str:
        return f"[{r[f'{metric}_ci_low']:.2f}, {r[f'{metric}_ci_high']:.2f}]"

    def versus(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
        gap = a[metric] - b[metric]
        apart = a[f"{metric}_ci_low"] > b[f"{metric}_ci_high"] or b[f"{metric}_ci_low"] > a[f"{metric}_ci_high"]
        tokens = ""
        if a.get("prompt_tokens") and b.get("prompt_tokens"):
            tokens = f" at {100 * a['prompt_tokens'] / b['prompt_tokens']:.0f}% of its prompt length"
        verdict = ("the 95% intervals do not overlap" if apart
                   else "the 95% intervals overlap, so the gap is not resolved")
        change = (f"gains {gap:+.2f} {metric} over {b['arm']}" if gap >= 0
                  else f"trails {b['arm']} by {-gap:.2f} {metric}")
        return f"{a['arm']} {change}{tokens} ({verdict})"

    text = [f"{best['arm']} scores highest: {metric} {best[metric]:.2f} {ci(best)}."]
    prompting = [r for name, r in by_arm.items() if r.get("trainable_params") is None]
    tuned = [r for name, r in by_arm.items() if r.get("trainable_params") is not None]
    if prompting and tuned:
        best_prompt = max(prompting, key=lambda r: r[metric])
        best_tuned = max(tuned, key=lambda r: r[metric])
        text.append(f"Of the fine-tuned arms, {versus(best_tuned, best_prompt)}.")
        if best_tuned.get("train_s"):
            text.append(f"That run trained {int(best_tuned['trainable_params']):,} parameters in "
                        f"{best_tuned['train_s']:.0f} s.")
    hits = [r for r in by_arm.values() if r.get("retrieval_hit") is not None]
    if hits:
        text.append("Retrieval put the passage holding the answer into the prompt for "
                    + ", ".join(f"{100 * r['retrieval_hit']:.0f}% ({r['arm']})" for r in hits) + " of questions.")
    changed = next((k for k in best if k.startswith(f"{metric} (") and k.endswith("=True)")), None)
    if changed:
        parts = [f"{r['arm']} {r[changed]:.2f}" for r in by_arm.values() if r.get(changed) is not None]
        text.append(f"On the facts that changed ({changed.split('(')[1].rstrip(')')}): " + ", ".join(parts) + ".")
    cost = cost_sentence(by_arm, best)
    text += [cost] if cost else []
    if all(r[metric] == 0 for r in by_arm.values()):
        text.append("Every arm scores 0: the model cannot do this task in any setting here.")
    return " ".join(text)


def cost_sentence(by_arm: Mapping[str, Mapping[str, Any]], best: Mapping[str, Any]) -> str | None:
    """What the winning arm spends in context window per answer, against zero-shot (the arm named `*zero_shot`
    without a fine-tuned run, else any `*zero_shot` arm); None without such an arm or without token figures."""
    zero = sorted((r for name, r in by_arm.items() if str(name).endswith("zero_shot")),
                  key=lambda r: r.get("trainable_params") is not None)
    key = "total_tokens" if all(r.get("total_tokens") for r in (best, *zero[:1])) else "prompt_tokens"
    if not zero or not best.get(key) or not zero[0].get(key):
        return None
    what = "tokens of context (prompt and answer)" if key == "total_tokens" else "prompt tokens"
    spent = f"Per answer {best['arm']} spends {best[key]:.0f} {what}"
    if best is zero[0]:
        return spent + ", the zero-shot cost."
    return spent + f", {best[key] / zero[0][key]:.1f}× the {zero[0][key]:.0f} of {zero[0]['arm']}."


@verb(run_dir=True, lock=True)
def compare(cfg: DictConfig, run: RunContext) -> list[dict[str, Any]]:
    """Check the run and every arm, run every arm, write the table, chart and reading; returns the table rows."""
    if cfg.run is not None:
        find_run(str(cfg.run))  # before any arm is scored (a W&B reference is resolved here)
    shared = shared_overrides(cfg, run)
    configs = arm_configs(cfg, run.run_dir, shared, run)
    for name in (str(n) for n in cfg.arms if str(n) not in configs):
        log.warning("arm %r needs a fine-tuned run (run=<dir>); skipped", name)
    metric = headline(cfg, configs)
    before = before_table(cfg, metric)
    results = run_arms(cfg, run, configs, shared)
    dataset = next(iter(configs.values())).dataset.get("name")
    title = f"{dataset}: {metric} per arm (base_model={cfg.base_model}" + (
        f", run={Path(str(cfg.run)).name})" if cfg.run else ")")
    return write_report(run.run_dir, results, metric, title, before,
                        f"before: {Path(str(cfg.before)).name}" if before is not None else "before")


def write_report(out_dir: Path, results: Mapping[str, Mapping[str, float]], metric: str, title: str,
                 before: Sequence[Mapping[str, Any]] | None = None, before_name: str = "before"
                 ) -> list[dict[str, Any]]:
    """compare.csv, compare.md (table + reading), compare.png and reading.txt from the arms' metrics; with the
    table of an earlier comparison (`before`), before_after.png: both in one chart."""
    rows = table_rows(results, metric)
    with (out_dir / "compare.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = reading(rows, metric)
    chart(rows, metric, title, out_dir / "compare.png")
    (out_dir / "reading.txt").write_text(text + "\n")
    (out_dir / "compare.md").write_text(f"## {title}\n\n{markdown(rows, metric)}\n{text}\n")
    print(markdown(rows, metric))
    print(text)
    written = "compare.md, compare.csv, compare.png"
    if before is not None:
        before_after_chart(before, rows, metric, f"{title}, {before_name} and after", out_dir / "before_after.png")
        written += ", before_after.png"
    print(f"comparison: {out_dir}/{written}")
    return rows


if __name__ == "__main__":
    from tunelab.cli import run_verb

    run_verb("compare")
