"""Encoder features: embeddings of a batch, shard merging of memory-mapped arrays, k-NN accuracy, group means."""

import os
import re

import numpy as np
import torch

from util.data.vocabulary import assign_vocabulary, check_fixed_order

CHUNK_ROWS = 4096


def is_channel_model(model):
    return hasattr(model, "channel_embed")


def channel_rows(datasets, info: dict, source: str, model) -> list[int]:
    """The channel-embedding rows of the datasets' channels, by name in the checkpoint's vocabulary
    (``info['vocabulary']``, ``models_checkpoint.model_from_checkpoint``; an unknown name is a ``DatasetError``); for a
    whole-patch model, whose planes have one fixed order, the checked file positions (``check_fixed_order``)."""
    if is_channel_model(model):
        assign_vocabulary(datasets, info["vocabulary"], source=source)
        return datasets[0].embed_ids
    check_fixed_order(datasets[0], info["vocabulary"], info["name"], source)
    return datasets[0].channel_ids


@torch.no_grad()
def encode(model, imgs, channel_ids, pool):
    """imgs (N, C, H, W) -> (pooled (N, D), per-channel means (N, C, D) or None), float32.

    Pretraining models run `forward_encoder` with nothing masked (tokens come back shuffled and are put back in
    order with ids_restore); classifiers run `forward_features`, and apply `fc_norm` to token means when they
    were trained with global pooling. The class token is taken as the encoder gives it.
    """
    N, C = imgs.shape[:2]
    if hasattr(model, "forward_encoder"):
        latent, _, ids_restore = model.forward_encoder(imgs, 0.0, channel_ids)
        cls, tokens = latent[:, 0], latent[:, 1:]
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        post = torch.nn.Identity()
    else:
        x = model.forward_features(imgs, channel_ids) if is_channel_model(model) else model.forward_features(imgs)
        cls, tokens = x[:, 0], x[:, model.num_prefix_tokens :]
        post = model.fc_norm
    pooled = cls if pool == "cls" else post(tokens.mean(dim=1))
    per_channel = None
    if is_channel_model(model):
        per_channel = post(tokens.reshape(N, C, -1, tokens.shape[-1]).mean(dim=2)).float()
    return pooled.float(), per_channel


def open_array(path, shape):
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


def merge_shards(parts, name, shape, world_size):
    """Interleave the per-rank arrays parts/rank<r>.<name>.npy (rows r, r + W, ...) into parts/<name>.npy."""
    final = open_array(os.path.join(parts, f"{name}.npy"), shape)
    for rank in range(world_size):
        path = os.path.join(parts, f"rank{rank}.{name}.npy")
        if not os.path.exists(path):
            continue
        shard = np.load(path, mmap_mode="r")
        for k0 in range(0, len(shard), CHUNK_ROWS):
            k1 = min(k0 + CHUNK_ROWS, len(shard))
            final[rank + k0 * world_size : rank + (k1 - 1) * world_size + 1 : world_size] = shard[k0:k1]
        del shard
        os.remove(path)
    final.flush()
    return final


def knn_classify(train_features, train_labels, query_features, num_classes, k=20, t=0.07, chunk=CHUNK_ROWS):
    """Weighted k-NN on cosine similarity (as in DINO): vote weight exp(similarity / t) per neighbour.

    train_features (M, D) and query_features (Q, D): arrays (memory maps welcome; read in chunks);
    train_labels (M,) ints in [0, num_classes). Returns the class scores (Q, num_classes) as a float64 array.
    """
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    k = min(k, len(labels))
    scores = np.zeros((len(query_features), num_classes))
    for q0 in range(0, len(query_features), chunk):
        query = torch.nn.functional.normalize(torch.as_tensor(np.asarray(query_features[q0 : q0 + chunk])), dim=1)
        best_sim = torch.full((len(query), 0), -2.0)
        best_label = torch.zeros((len(query), 0), dtype=torch.long)
        for m0 in range(0, len(labels), chunk):
            memory = torch.nn.functional.normalize(torch.as_tensor(np.asarray(train_features[m0 : m0 + chunk])), dim=1)
            sim = torch.cat([best_sim, query @ memory.T], dim=1)
            label = torch.cat([best_label, labels[m0 : m0 + chunk].expand(len(query), -1)], dim=1)
            best_sim, index = sim.topk(min(k, sim.shape[1]), dim=1)
            best_label = torch.gather(label, 1, index)
        votes = torch.zeros(len(query), num_classes, dtype=torch.float64)
        votes.scatter_add_(1, best_label, (best_sim.double() / t).exp())
        scores[q0 : q0 + len(query)] = votes.numpy()
    return scores


def knn_accuracy(features, labels, is_train, is_query, num_classes, k, t):
    """k-NN with the labelled train rows as memory and the labelled query rows as queries.

    Returns (top-1 %, top-5 %, query row indices (Q,), predicted classes (Q,)).
    """
    train_rows = np.flatnonzero(is_train & (labels >= 0))
    query_rows = np.flatnonzero(is_query & (labels >= 0))
    if len(train_rows) == 0 or len(query_rows) == 0:
        raise ValueError("k-NN needs labelled train and val samples")
    train_features = RowView(features, train_rows)
    scores = knn_classify(train_features, labels[train_rows], RowView(features, query_rows), num_classes, k, t)
    ranked = np.argsort(-scores, axis=1, kind="stable")
    target = labels[query_rows][:, None]
    top1 = float((ranked[:, :1] == target).any(axis=1).mean() * 100)
    top5 = float((ranked[:, :5] == target).any(axis=1).mean() * 100)
    return top1, top5, query_rows, ranked[:, 0]


class RowView:
    """Rows `rows` of a (memory-mapped) array, sliced lazily: view[a:b] reads only those rows."""

    def __init__(self, array, rows):
        self.array, self.rows = array, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.array[self.rows[index]]


def group_means(features, paths, regex):
    """Mean feature per group named by `regex` on each path: (names (G,), means (G, D), counts (G,))."""
    pattern = re.compile(regex)
    keys = []
    for path in paths:
        match = pattern.search(path)
        if match is None:
            raise ValueError(f"--group_regex {regex!r} does not match {path}")
        keys.append(match.group(1) if pattern.groups else match.group(0))
    names, inverse = np.unique(np.asarray(keys), return_inverse=True)
    sums = np.zeros((len(names), features.shape[1]))
    for r0 in range(0, len(features), CHUNK_ROWS):
        np.add.at(sums, inverse[r0 : r0 + CHUNK_ROWS], np.asarray(features[r0 : r0 + CHUNK_ROWS], dtype=np.float64))
    counts = np.bincount(inverse, minlength=len(names))
    return names, (sums / counts[:, None]).astype(np.float32), counts
