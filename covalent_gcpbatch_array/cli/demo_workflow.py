"""The demo's workflow: Covalent's iris SVM example, turned into a C x gamma grid search.

Every pair of the grid is a ``train_svm`` electron and a ``score_svm`` electron on the
``gcpbatch_array`` executor, each with ``ct.DepsPip`` for the packages it imports; the grid's
electrons run in parallel, coalesced into a few Batch array jobs. ``pick_best`` then runs on
the server.

The electrons live in this importable module, so tasks unpickle them by reference: the task's
Python must have this package installed (the local cloud's tasks use this very venv).

Run it against a Covalent server whose config has ``[executors.gcpbatch_array]`` (for example
after ``gcpbatch-array local up`` and ``covalent start``)::

    python -m covalent_gcpbatch_array.cli.demo_workflow
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from typing import Any

import covalent as ct

__all__ = [
    "DEFAULT_C_VALUES",
    "DEFAULT_GAMMA_VALUES",
    "grid_search",
    "load_data",
    "pick_best",
    "score_svm",
    "train_svm",
]

#: The grid searched by default: 6 x 4 = 24 (C, gamma) pairs, 48 electrons on the executor.
DEFAULT_C_VALUES = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
DEFAULT_GAMMA_VALUES = (0.01, 0.1, 0.7, 3.0)
EXECUTOR = "gcpbatch_array"  # the short name: settings come from the Covalent config file
TRAIN_SIZE = 60  # the first TRAIN_SIZE shuffled samples train, the other 90 score
_SEED = 1  # fixed shuffle: the same table on every run

_SCIENCE = ct.DepsPip(packages=["numpy", "scikit-learn"])


@ct.electron(executor=EXECUTOR, deps_pip=_SCIENCE)
def load_data() -> tuple[Any, Any]:
    """The iris data set (shipped with scikit-learn: no download), shuffled."""
    from numpy.random import default_rng
    from sklearn import datasets

    iris = datasets.load_iris()
    order = default_rng(_SEED).permutation(iris.target.size)
    print(f"loaded iris: {iris.data.shape[0]} samples, {iris.data.shape[1]} features")
    return iris.data[order], iris.target[order]


@ct.electron(executor=EXECUTOR, deps_pip=_SCIENCE)
def train_svm(data: tuple[Any, Any], C: float, gamma: float) -> Any:
    """An RBF support vector classifier fitted on the training part."""
    from sklearn import svm

    features, labels = data
    model = svm.SVC(C=C, gamma=gamma)
    model.fit(features[:TRAIN_SIZE], labels[:TRAIN_SIZE])
    print(f"trained SVC(C={C}, gamma={gamma}): {len(model.support_)} support vectors")
    return model


@ct.electron(executor=EXECUTOR, deps_pip=_SCIENCE)
def score_svm(data: tuple[Any, Any], model: Any) -> float:
    """The model's accuracy on the held-out part."""
    features, labels = data
    score = float(model.score(features[TRAIN_SIZE:], labels[TRAIN_SIZE:]))
    print(f"scored SVC(C={model.C}, gamma={model.gamma}): {score:.3f}")
    return score


@ct.electron(executor="local")
def pick_best(
    scores: list[float], c_values: list[float], gamma_values: list[float]
) -> dict[str, Any]:
    """The grid's scores by (C, gamma), and the best pair (the smallest C among ties)."""
    pairs = list(itertools.product(c_values, gamma_values))
    table = {f"{c:g},{g:g}": s for (c, g), s in zip(pairs, scores, strict=True)}
    best = max(range(len(pairs)), key=lambda i: (scores[i], -pairs[i][0], -pairs[i][1]))
    return {
        "scores": table,
        "best": {"C": pairs[best][0], "gamma": pairs[best][1], "score": scores[best]},
    }


# The collection nodes Covalent adds (lists of results) run on the server too.
@ct.lattice(executor="local", workflow_executor="local")
def grid_search(c_values: list[float], gamma_values: list[float]) -> dict[str, Any]:
    """Train and score an SVM for every (C, gamma) pair, in parallel; return the best."""
    data = load_data()
    scores = []
    for c, gamma in itertools.product(c_values, gamma_values):
        model = train_svm(data=data, C=c, gamma=gamma)
        scores.append(score_svm(data=data, model=model))
    return pick_best(scores, c_values, gamma_values)


def electron_count(c_values: Sequence[float], gamma_values: Sequence[float]) -> int:
    """How many electrons of a grid run on the executor (load, then train + score per pair)."""
    return 1 + 2 * len(c_values) * len(gamma_values)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch the grid search to the Covalent server of the config file and print the best."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dispatcher", default=None, help="http://HOST:PORT of the server")
    args = parser.parse_args(argv)
    dispatch_id = ct.dispatch(grid_search, dispatcher_addr=args.dispatcher)(
        list(DEFAULT_C_VALUES), list(DEFAULT_GAMMA_VALUES)
    )
    print(f"dispatched {dispatch_id}; waiting for the result ...", flush=True)
    result = ct.get_result(dispatch_id, wait=True, dispatcher_addr=args.dispatcher)
    print(f"status: {result.status}")
    if str(result.status) != "COMPLETED":
        print(result.error, file=sys.stderr)
        return 1
    output: Any = result.result
    best = output["best"]
    print(f"best: C={best['C']:g}, gamma={best['gamma']:g}, accuracy {best['score']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
