"""Training-only augmentation and the batch pipeline that feeds `fit`.

Images stay uint8 in memory (a quarter of float32's footprint) and are scaled per batch, inside the
tf.data graph, exactly as `device.core.normalize` scales them at inference. Augmentation happens
there too, on the uint8 batch before scaling: it is never a layer of the model, so it cannot reach
the exported `.tflite`, the calibration sample or the evaluation, which all read the plain arrays.
"""
from __future__ import annotations

import math

import numpy as np

PAD = 4  # pixels of zero padding around a CIFAR-sized image before the random crop (the usual recipe)


def pad_for(side: int) -> int:
    """The crop's largest shift: CIFAR's 4 pixels is an eighth of its 32; a 64-pixel photo gets 8, not 4."""
    return max(PAD, side // 8)

# Digits are not mirror-symmetric (a flipped 2 is not a 2) and are centred by construction.
DEFAULT_ON = {"cifar10": True, "folder": True, "mnist": False, "digits": False}


def default_augment(dataset: str) -> bool:
    return DEFAULT_ON.get(dataset, False)


def augment_batch(images, seed):
    """Pad-and-crop (a random shift of up to `pad_for` the side) and a random horizontal flip, per image.

    `images` is a uint8 (B, H, W, C) tensor; `seed` a shape-[2] int tensor. Stateless random ops make
    each batch's augmentation a function of (seed, step) only, so a seeded build repeats exactly.
    """
    import tensorflow as tf

    shape = tf.shape(images)
    b, h, w = shape[0], shape[1], shape[2]
    s_row, s_col, s_flip = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    py, px = pad_for(images.shape[1]), pad_for(images.shape[2])
    padded = tf.pad(images, [[0, 0], [py, py], [px, px], [0, 0]])
    dy = tf.random.stateless_uniform([b], s_row, 0, 2 * py + 1, dtype=tf.int32)
    dx = tf.random.stateless_uniform([b], s_col, 0, 2 * px + 1, dtype=tf.int32)
    # A crop per image as two batched gathers: rows, then columns, each offset by that image's shift.
    out = tf.gather(padded, dy[:, None] + tf.range(h)[None], axis=1, batch_dims=1)
    out = tf.gather(out, dx[:, None] + tf.range(w)[None], axis=2, batch_dims=1)
    flip = tf.random.stateless_uniform([b], s_flip) < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(out, axis=[2]), out)


def batches(x: np.ndarray, y: np.ndarray, *, batch_size: int, classes: int, scale: float, offset: float,
            epochs: int = 1, shuffle: bool = False, augment: bool = False, seed: int = 0, first_epoch: int = 0,
            plain_from: int | None = None):
    """A tf.data pipeline of (scaled float32 images, one-hot labels) over `epochs` passes, starting at
    `first_epoch` (a resumed training sees the same order and augmentation as a straight one); with
    `augment`, epochs from `plain_from` on see the images unaugmented.

    Returns (dataset, steps per epoch). One-hot labels let the loss apply label smoothing.
    """
    import tensorflow as tf

    images, labels = tf.constant(x), tf.constant(y.astype(np.int32))
    order = tf.data.Dataset.range(len(x))
    if shuffle:
        order = order.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    # Batched before repeated, so every epoch is whole; enumerated after, so each step has its own seed.
    steps = math.ceil(len(x) / batch_size)
    stream = order.batch(batch_size).repeat(epochs).enumerate().skip(first_epoch * steps)

    def load(step, index):
        batch = tf.gather(images, index)
        if augment:
            def augmented():
                return augment_batch(batch, tf.stack([tf.cast(seed, tf.int64), step]))

            plain = plain_from is not None and plain_from < epochs
            batch = tf.cond(step < plain_from * steps, augmented, lambda: batch) if plain else augmented()
        pixels = tf.cast(batch, tf.float32) * np.float32(scale) + np.float32(offset)
        return pixels, tf.one_hot(tf.gather(labels, index), classes)

    dataset = stream.map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    return dataset, steps
