"""Nearest-neighbour classification of frozen embeddings: the k-NN protocol and CHAMMI-style tasks.

CHAMMI (Chen et al., 2023; broadinstitute/MorphEm) scores an encoder by a 1-nearest-neighbour classifier on its
frozen embeddings, with macro-F1 over the classes present in each test set. Test sets hold out whole domains
(plates, sources, cell lines); a leave-one-out task tests each domain in turn against a classifier fitted on the
training rows plus the task's other domains. Tasks come from a JSON file:

    {"label_column": "label",
     "tasks": [{"name": "WTC_Task_two", "column": "plate", "test": ["P3", "P4"]},
               {"name": "CP_Task_four", "column": "source", "leave_one_out": true},
               {"name": "HPA_Task_one", "column": "split", "train": ["train"], "test": ["val"]}]}

``test`` values of ``column`` form the test rows (a leave-one-out task with no ``test`` uses every value);
``train`` values the training rows (default: every row not tested). Unlabelled rows ('' label) are left out.
"""

import json
import os
import re

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier

from util.errors import RunError
from util.features import knn_accuracy
from util.protocols.featureset import FeatureSet

CHAMMI_TASK = re.compile(r"^(wtc|allen|hpa|cp)[_\- ]?(?:task[_\- ]?)?(one|two|three|four|[1-4])$", re.IGNORECASE)
TASK_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}
CHAMMI_WEIGHTS = {("WTC", 2): 1 / 3, ("HPA", 2): 1 / 6, ("HPA", 3): 1 / 6, ("CP", 2): 1 / 9, ("CP", 3): 1 / 9}
CHAMMI_WEIGHTS[("CP", 4)] = 1 / 9


def one_nn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """Labels of the nearest training row by cosine distance: train_x (M, D), test_x (Q, D) -> (Q,)."""
    classifier = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute")
    return classifier.fit(train_x, train_y).predict(test_x)


def scores(truth: np.ndarray, pred: np.ndarray) -> dict:
    """macro-F1 over the classes present in ``truth`` (as MorphEm does), top-1 in percent, and the row count."""
    present = np.unique(truth)
    macro_f1 = f1_score(truth, pred, labels=present, average="macro", zero_division=0)
    return {"macro_f1": float(macro_f1), "top1": float(accuracy_score(truth, pred) * 100), "n_test": len(truth)}


def read_tasks(path: str) -> dict:
    """The task file: {'label_column': str, 'tasks': [task, ...]}; ``RunError`` naming the file and the task."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"--tasks {path} is not a readable JSON file: {e}") from e
    tasks = config.get("tasks") if isinstance(config, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise RunError(f"--tasks {path} must hold {{'tasks': [...]}} with at least one task")
    known = {"name", "column", "test", "train", "leave_one_out"}
    for i, task in enumerate(tasks):
        if not isinstance(task, dict) or "name" not in task or "column" not in task:
            raise RunError(f"--tasks {path}: task {i} needs a 'name' and a 'column'")
        if set(task) - known:
            raise RunError(f"--tasks {path}: task '{task['name']}' has unknown keys {sorted(set(task) - known)}")
        if "test" not in task and not task.get("leave_one_out"):
            raise RunError(f"--tasks {path}: task '{task['name']}' needs 'test' values (or leave_one_out)")
    if len({t["name"] for t in tasks}) != len(tasks):
        raise RunError(f"--tasks {path}: task names must be distinct")
    return {"label_column": config.get("label_column", "label"), "tasks": tasks, "file": os.path.abspath(path)}


def task_rows(fs: FeatureSet, task: dict, labelled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (N,) masks of the training and test rows of ``task``."""
    values = fs.column(task["column"])
    test_values = task.get("test", sorted(set(values[labelled])))
    missing = sorted(set(map(str, test_values)) - set(values))
    if missing:
        raise RunError(f"task '{task['name']}': column '{task['column']}' has no rows with value(s) {missing}")
    test = np.isin(values, [str(v) for v in test_values]) & labelled
    train = (np.isin(values, [str(v) for v in task["train"]]) if "train" in task else ~test) & labelled & ~test
    return train, test


def run_task(fs: FeatureSet, task: dict, labels: np.ndarray) -> dict:
    """One task's 1-NN scores; a leave-one-out task pools the predictions of every held-out domain."""
    labelled = labels != ""
    train, test = task_rows(fs, task, labelled)
    if not task.get("leave_one_out"):
        if not train.any():
            raise RunError(f"task '{task['name']}' has no labelled training rows")
        pred = one_nn_predict(fs.features[train], labels[train], fs.features[test])
        return {**scores(labels[test], pred), "n_train": int(train.sum())}
    values = fs.column(task["column"])
    truth, pred, memory_sizes = [], [], []
    for held_out in np.unique(values[test]):
        query = test & (values == held_out)
        memory = train | (test & (values != held_out))
        if not memory.any():
            raise RunError(f"task '{task['name']}': holding out '{held_out}' leaves no training rows")
        memory_sizes.append(int(memory.sum()))
        truth.append(labels[query])
        pred.append(one_nn_predict(fs.features[memory], labels[memory], fs.features[query]))
    result = scores(np.concatenate(truth), np.concatenate(pred))
    held_out = [str(v) for v in np.unique(values[test])]
    return {**result, "n_train": round(float(np.mean(memory_sizes))), "held_out": held_out}


def chammi_key(name: str):
    """'WTC_Task_two' / 'Allen-Task2' / 'cp4' -> ('WTC', 2); None for other names."""
    match = CHAMMI_TASK.match(name)
    if match is None:
        return None
    dataset = {"ALLEN": "WTC"}.get(match.group(1).upper(), match.group(1).upper())
    number = match.group(2).lower()
    return dataset, TASK_NUMBERS.get(number) or int(number)


def chammi_score(results: dict) -> float | None:
    """WTC2/3 + (HPA2 + HPA3)/6 + (CP2 + CP3 + CP4)/9 on macro-F1 when all six tasks are present, else None."""
    f1 = {chammi_key(name): r["macro_f1"] for name, r in results.items() if chammi_key(name)}
    if not set(CHAMMI_WEIGHTS) <= set(f1):
        return None
    return float(sum(weight * f1[key] for key, weight in CHAMMI_WEIGHTS.items()))


def chammi_protocol(fs: FeatureSet, config: dict) -> dict:
    """{task name: scores} for every task of the config, plus 'CHAMMI_score' when the names allow it."""
    labels = fs.column(config["label_column"])
    results = {task["name"]: run_task(fs, task, labels) for task in config["tasks"]}
    score = chammi_score(results)
    if score is not None:
        results["CHAMMI_score"] = {"macro_f1": score}
    return results


def knn_protocol(fs: FeatureSet, k: int = 20, t: float = 0.07) -> dict:
    """Train split as memory, val split as queries: 1-NN (cosine) macro-F1 and top-1, weighted k-NN top-1/5."""
    split = fs.column("split")
    train, val = (split == "train") & (fs.labels >= 0), (split == "val") & (fs.labels >= 0)
    if not train.any() or not val.any():
        raise RunError(f"{fs.path}: the knn protocol needs labelled 'train' and 'val' rows (extract --split trainval)")
    pred = one_nn_predict(fs.features[train], fs.labels[train], fs.features[val])
    one_nn = scores(fs.labels[val], pred)
    top1, top5, _, _ = knn_accuracy(fs.features, fs.labels, train, val, len(fs.classes), k, t)
    weighted = {"top1": top1, "top5": top5, "n_test": int(val.sum()), "k": k, "t": t}
    return {"1nn": {**one_nn, "n_train": int(train.sum())}, f"{k}nn_weighted": weighted}
