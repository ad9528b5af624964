"""Short screens of ResNet-8 training ideas the pipeline has no option for (issue 20.6), against the default recipe
trained for the same epochs from the same seed: an idea worth a 60-epoch `pipeline build` must gain here first.

The 85% goal needed about +0.8 pp over the best 60-epoch recipe (84.16% int8), more than one seed's spread (0.49 pp),
so an idea that does not gain that much at 15 epochs is not run at 60; a regulariser, which costs fit in a short
run by design, is screened at 60 (`--epochs 60`) against a recipe's 60-epoch build. Each screen trains through
`pipeline.train.train` (the build's data, augmentation, recipe and seed) and scores fp32 on the 8,000 test JPEGs.

- `default`: the model's recipe as `pipeline build` trains it.
- `pca-stem`: the stem's 16 filters set to the 8 principal components of the training images' 3x3 patches and their
  negatives, and frozen (the patch whitening of Jordan's airbench, ReLU keeping both signs); BatchNorm follows the
  stem, so the components' scale does not matter.
- `distill`: a ResNet-14 teacher trained beside the student on the same batches (online distillation: the images
  seen stay the epochs' worth, the time an epoch is about 2.5 times), the student's loss half the labels' and half
  the teacher's softened outputs (temperature 4).
- `jpeg-again`: every image (training, validation and test) stored once more as the folder's JPEGs are (quality 75,
  4:2:0 chroma), on a grid shifted by 3 pixels so that it loses detail again: what one more generation of the
  folder's compression costs, most likely a lower bound of what the first cost against MLPerf Tiny's lossless images.
- `cutout`: after the build's pad-crop and flip, an 8x8 square of each training image set to mid-grey at a random
  centre (DeVries and Taylor's Cutout, scaled down from their 16 for a model with a twelfth of the weights): a
  regulariser for the 3-6 pp by which the 60-epoch recipes fit the training images better than the validation ones.
- `plain-end`: the last tenth of the epochs without augmentation: at the lowest learning rates the model fits the
  images as the test split has them, never shifted against a black border or mirrored (YOLO's last epochs without
  mosaic, FixRes's fine-tuning at the test-time input).

`--recipe NAME` trains a screen with a recipe of `resnet8_recipes.py` instead of the default (results named
`SCREEN+RECIPE`), to ask whether an idea adds to the best recipe.

The screens of an existing --json file that are not run again are kept in it (marked so).

    python benchmarks/resnet8_screens.py [SCREEN...] [--epochs 15] [--recipe NAME] [--json FILE]
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from resnet8_recipes import RECIPES, options_of
from series import chosen, kept

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from device.core import environment, normalize  # noqa: E402
from device.timing import features_words  # noqa: E402

DATA = REPO.parent / "shared" / "datasets" / "cifar10-jpg"
ALPHA, TEMPERATURE = 0.5, 4.0
CUTOUT = 8
PLAIN_END = 0.1


def pca_stem(model, data) -> None:
    rng = np.random.default_rng(0)
    x = normalize(data.x_train[rng.choice(len(data.x_train), 5000, replace=False)], data.spec.to_dict())
    # Every 3x3 patch as a row in Keras's kernel order (row, column, channel).
    patches = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)
    patches = patches.reshape(-1, 27)
    values, vectors = np.linalg.eigh(patches.T @ patches / len(patches))
    top = vectors[:, np.argsort(values)[::-1][:8]]
    stem = model.get_layer("stem")
    stem.set_weights([np.concatenate([top, -top], axis=1).reshape(3, 3, 3, 16).astype(np.float32),
                      np.zeros(16, np.float32)])
    stem.trainable = False


def distill(model, label_smoothing: float) -> dict:
    """Make `model.fit` train a ResNet-14 teacher beside `model` and distil it into `model` at every step."""
    import keras
    import tensorflow as tf

    from pipeline.models import cifar_resnet8

    teacher = cifar_resnet8(model.input_shape[1:], model.output_shape[-1], blocks=2, name="teacher")
    labels = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)

    def soft(probabilities):  # the models end in softmax: log-probabilities are logits up to a constant
        return tf.math.log(probabilities + 1e-8) / TEMPERATURE

    def train_step(data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        weights = model.trainable_weights + teacher.trainable_weights
        with tf.GradientTape() as tape:
            s, t = model(x, training=True), teacher(x, training=True)
            targets = tf.stop_gradient(tf.nn.softmax(soft(t)))
            kd = -tf.reduce_mean(tf.reduce_sum(targets * tf.nn.log_softmax(soft(s)), -1)) * TEMPERATURE ** 2
            student = (1 - ALPHA) * labels(y, s) + ALPHA * kd + tf.add_n(model.losses)
            loss = student + labels(y, t) + tf.add_n(teacher.losses)
        model.optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights))
        for metric in model.metrics:
            if metric.name == "loss":
                metric.update_state(student, sample_weight=tf.shape(x)[0])
        return model.compute_metrics(x, y, s, sample_weight=None)

    model.train_step = train_step
    return {"teacher": teacher}


def jpeg_again(images: np.ndarray, shift: int = 3) -> np.ndarray:
    from PIL import Image

    out = np.empty_like(images)
    for i, image in enumerate(images):
        # Reflected padding moves the 8x8 blocks and the 2x2 chroma cells off the grid the stored JPEG used.
        padded = np.pad(image, ((shift, 8 - shift), (shift, 8 - shift), (0, 0)), mode="reflect")
        buffer = io.BytesIO()
        Image.fromarray(padded).save(buffer, "JPEG", quality=75, subsampling="4:2:0")
        height, width = image.shape[:2]
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))[shift:shift + height, shift:shift + width]
    return out


def with_cutout(augment_batch):
    """`augment_batch` followed by Cutout: stateless like it, so a seeded screen repeats exactly."""
    import tensorflow as tf

    def augmented(images, seed):
        out = augment_batch(images, seed)
        shape = tf.shape(out)
        centres = tf.random.stateless_uniform([shape[0], 2], seed + 1, 0, shape[1], dtype=tf.int32)
        # Offsets from each square's top-left corner; the square may hang over the border, as in the paper.
        rows = tf.range(shape[1])[None, :, None] - centres[:, 0, None, None] + CUTOUT // 2
        cols = tf.range(shape[2])[None, None, :] - centres[:, 1, None, None] + CUTOUT // 2
        inside = (rows >= 0) & (rows < CUTOUT) & (cols >= 0) & (cols < CUTOUT)
        return tf.where(inside[..., None], tf.constant(128, out.dtype), out)

    return augmented


def screen(name: str, epochs: int, recipe: str) -> dict:
    from pipeline.build import load_inputs
    from pipeline.config import BuildConfig
    from pipeline.data import augment
    from pipeline.models import build_model
    from pipeline.train import seed_everything, train

    # plain-end became `--plain-epochs` after its screen: the build's own switch, the same steps.
    tail = {"plain_epochs": round(epochs * PLAIN_END)} if name == "plain-end" else {}
    cfg = BuildConfig(dataset="cifar10", data_dir=str(DATA), model="cifar-resnet8", epochs=epochs,
                      **options_of(RECIPES[recipe]), **tail)
    data, _, _ = load_inputs(cfg, {"train", "evaluate"}, lambda *a: None)
    if name == "jpeg-again":
        data = dataclasses.replace(data, x_train=jpeg_again(data.x_train), x_val=jpeg_again(data.x_val),
                                   x_test=jpeg_again(data.x_test))
    seed_everything(cfg.seed)
    model, extra = build_model(cfg.model, data.x_train.shape[1:], len(data.spec.labels)), {}
    if name == "pca-stem":
        pca_stem(model, data)
    elif name == "distill":
        extra = distill(model, cfg.label_smoothing)
    plain = augment.augment_batch
    if name == "cutout":
        augment.augment_batch = with_cutout(plain)
    t0 = time.perf_counter()
    try:
        model, history = train(cfg, data, log=lambda *a: None, model=model)
    finally:
        augment.augment_batch = plain
    x = normalize(data.x_test, data.spec.to_dict())
    scored = {"fp32": model, **extra}
    accuracy = {k: float(np.mean(m.predict(x, batch_size=500, verbose=0).argmax(1) == data.y_test))
                for k, m in scored.items()}
    return {"epochs": epochs, "recipe": recipe, "test_accuracy": accuracy, "test_images": len(x),
            "train_s": round(time.perf_counter() - t0),
            "val_accuracy": [round(v, 4) for v in history["val_accuracy"]],
            "train_accuracy_end": round(history["accuracy"][-1], 4),
            "epoch_s_median": float(np.median(history["epoch_seconds"]))}


def main() -> None:
    names = ["default", "pca-stem", "distill", "jpeg-again", "cutout", "plain-end"]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("screens", nargs="*", metavar="SCREEN", help=f"{', '.join(names)} (default: all)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--recipe", choices=list(RECIPES), default="default")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    wanted = chosen(ap, args.screens, names, "screen")
    # plain-end sets the tail itself: on a recipe that has one the screen would not differ from the recipe.
    if "plain-end" in wanted and "plain_epochs" in options_of(RECIPES[args.recipe]):
        ap.error(f"plain-end ends the training plain itself; recipe {args.recipe} already does (--plain-epochs): "
                 "screen it on a recipe without one")
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this benchmark reads the CIFAR-10 JPEG folders there")
    env = environment()
    env.update(cpu_words=features_words(env["cpu_features"]), started=time.strftime("%Y-%m-%d %H:%M:%S"))
    results = kept(args.json)
    for name in wanted:
        key = name if args.recipe == "default" else f"{name}+{args.recipe}"
        results[key] = screen(name, args.epochs, args.recipe)
        print(f"{key}: fp32 {results[key]['test_accuracy']['fp32']:.2%} after {args.epochs} epochs", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"environment": env, "results": results}, indent=2))


if __name__ == "__main__":
    main()
