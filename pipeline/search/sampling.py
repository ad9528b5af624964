"""Which (candidate, learning rate) configurations the search trains, and in what order.

A space no larger than --trials is trained whole, each configuration once. A larger one is sampled by Optuna
(through Ray Tune), which learns from finished trials but, over a space of a few categorical choices, often
proposes a configuration it has already trained: a repeat costs a whole trial and teaches nothing, since a
trial's seed is the search's. `Unrepeated` asks Optuna again, and after a few repeats takes the first
configuration not yet tried, so every trial of a search trains something new.

It also trains every candidate once before any twice (at another learning rate): Optuna's sampler scores each
categorical choice on its own, so what one architecture's trials teach it says nothing of another's, and a
40-trial search over 32 candidates at two rates passed a candidate by about one time in four (31/32 to the 40th).
That first pass takes the candidates in the order given (the search gives them the largest files first:
feasibility.by_weights), each at the first of the learning rates, and Optuna learns from
each as a point evaluated outside it; then it proposes among the configurations left. A 60-minute search that
took Optuna's order for the first pass had, 28 trials in, just reached the candidate that led after a trial in
the search before, and at the rate that holds a ResNet back 6-7 points.
"""
from __future__ import annotations

import copy

from ray import tune
from ray.tune.search import Searcher

from pipeline.search.trial import LEARNING_RATES

ASKS = 8  # Optuna's proposals per trial before the first untried configuration is taken instead


def configurations(feasible: list[str]) -> list[dict]:
    """Every configuration, in the stable order the candidates and rates are listed in."""
    return [{"candidate": c, "learning_rate": lr} for c in feasible for lr in LEARNING_RATES]


def plan(feasible: list[str], trials: int, seed: int) -> tuple[dict, Searcher | None, int]:
    """(Tune's param_space, search algorithm, num_samples) for up to `trials` trials."""
    every = configurations(feasible)
    if len(every) <= trials:
        return ({"candidate": tune.grid_search(feasible), "learning_rate": tune.grid_search(list(LEARNING_RATES))},
                None, 1)
    # Imported here: a search trained whole (a grid) never loads Optuna.
    from ray.tune.search.optuna import OptunaSearch

    space = {"candidate": tune.choice(feasible), "learning_rate": tune.choice(list(LEARNING_RATES))}
    return space, Unrepeated(OptunaSearch(seed=seed), every), trials


class Unrepeated(Searcher):
    """A Tune searcher that passes Optuna's proposals through and never gives a configuration twice."""

    def __init__(self, searcher: Searcher, every: list[dict]):
        self.searcher = searcher
        self.untried = list(every)
        self.inner_ids: dict[str, str | None] = {}  # our trial id -> the id Optuna knows it by (None: not Optuna's)
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        ok = self.searcher.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.searcher.metric, self.searcher.mode
        return ok

    def suggest(self, trial_id: str):
        if not self.untried:
            return Searcher.FINISHED
        unseen = self._unseen()
        if unseen:
            return self._first_pass(trial_id, unseen)
        for ask in range(ASKS):
            inner_id = trial_id if ask == 0 else f"{trial_id}-ask{ask}"
            config = self.searcher.suggest(inner_id)
            if config is None or config == Searcher.FINISHED:
                return config
            chosen = {k: config[k] for k in ("candidate", "learning_rate")}
            if chosen in self.untried:
                self.untried.remove(chosen)
                self.inner_ids[trial_id] = inner_id
                return config
            # A failed Optuna trial: its sampler neither counts the repeat as a result nor proposes around it.
            self.searcher.on_trial_complete(inner_id, error=True)
        chosen = self.untried[0]
        self.untried.remove(chosen)
        self.inner_ids[trial_id] = None
        return dict(chosen)

    def _first_pass(self, trial_id: str, unseen: set[str]) -> dict:
        """The first candidate in the order given not trained yet, at the first learning rate (`untried` lists
        each candidate's rates in LEARNING_RATES' order); Optuna learns from it once it is evaluated."""
        chosen = next(c for c in self.untried if c["candidate"] in unseen)
        self.untried.remove(chosen)
        self.inner_ids[trial_id] = None
        return dict(chosen)

    def _unseen(self) -> set[str]:
        """Candidates not trained at all yet: every one of their learning rates is still untried (derived from
        `untried`, so a search saved before this rule resumes with it)."""
        left: dict[str, int] = {}
        for c in self.untried:
            left[c["candidate"]] = left.get(c["candidate"], 0) + 1
        return {c for c, n in left.items() if n == len(LEARNING_RATES)}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.inner_ids.get(trial_id):
            self.searcher.on_trial_result(self.inner_ids[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        inner_id = self.inner_ids.get(trial_id)
        if inner_id:
            self.searcher.on_trial_complete(inner_id, result=result, error=error)
        elif result and not error and self.metric in result:
            # A configuration Optuna did not propose still teaches it, as a point evaluated outside it.
            config = result.get("config", {})
            chosen = {k: config[k] for k in ("candidate", "learning_rate") if k in config}
            if len(chosen) == 2:
                self.searcher.add_evaluated_point(chosen, result[self.metric])

    # --resume: Tune's SearchGenerator keeps a wrapper's bookkeeping through get_state/set_state and saves the
    # searcher it wraps (found through `.searcher`) itself, as for Ray's own ConcurrencyLimiter.
    def get_state(self) -> dict:
        state = self.__dict__.copy()
        del state["searcher"]
        return copy.deepcopy(state)

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
