"""Self-supervised pretraining on COVID-SemiSeg's unlabelled pool (issue #27, category: plus unlabelled):
the whole model learns to restore pool slices from Models Genesis' corruptions (Zhou et al., 2019), and
its weights then start a fine-tuning run on the labelled slices through `--config.model_init`.

    python -m experiments.restoration_pretraining --data_root ../shared/data --workdir runs/restore-pool
    python -m rdunet_jax.main --config configs/semiseg.py \\
        --config.data.manual_dir=../shared/data/covid-semiseg --workdir runs/restore-init-cv0 \\
        --config.data.cv_folds=5 --config.data.cv_fold=0 --config.eval.split=validation \\
        --config.model_init=runs/restore-pool

The pool is the same for every fold and holds no labelled slice, so one pretraining serves all five folds.
Its slices are window-matched (`data.unlabelled_intensity_matching=window`) to the images, never the masks,
of the release's train.txt slices. The corruptions, each at Models Genesis' default rate: a random
monotone Bezier intensity curve (0.9, half of them inverted), local pixel shuffling (0.5), and painting
(0.9): in-painting boxes with noise (a fifth of the paintings) or out-painting (noise everywhere but a box).
The target is the flipped, uncorrupted slice; the loss the mean squared error of the sigmoid output.
"""

import argparse
import pathlib
import time

import numpy as np

from experiments import common

# Models Genesis' default rates (nonlinear_rate, local_rate, paint_rate, inpaint_rate of its configs).
NONLINEAR_RATE, SHUFFLE_RATE, PAINT_RATE, INPAINT_RATE = 0.9, 0.5, 0.9, 0.2


def bezier_curve(rng: np.random.Generator, points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """A monotone intensity map of [0, 1]: a cubic Bezier curve from (0, 0) to (1, 1) through two random
    control points in the unit square, as (x, y) sorted by x."""
    controls = np.array([[0.0, 0.0], rng.random(2), rng.random(2), [1.0, 1.0]])
    t = np.linspace(0.0, 1.0, points)[:, None]
    bernstein = np.hstack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3])
    curve = bernstein @ controls
    order = np.argsort(curve[:, 0])
    return curve[order, 0], np.maximum.accumulate(curve[order, 1])


def nonlinear_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image through a random monotone Bezier curve; half the time inverted (1 - curve)."""
    x, y = bezier_curve(rng)
    mapped = np.interp(image, x, y)
    return (1.0 - mapped) if rng.random() < 0.5 else mapped


def shuffle_local_pixels(image: np.ndarray, rng: np.random.Generator, blocks: int = 200) -> np.ndarray:
    """The image with the pixels of `blocks` random small windows (up to a tenth of the side) permuted
    within each window, the windows read from the original image."""
    size = image.shape[0]
    shuffled = image.copy()
    for _ in range(blocks):
        height, width = rng.integers(1, size // 10 + 1, size=2)
        row, column = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
        window = image[row : row + height, column : column + width].reshape(-1)
        shuffled[row : row + height, column : column + width] = rng.permutation(window).reshape(height, width)
    return shuffled


def _box(rng: np.random.Generator, size: int, low: float, high: float) -> tuple[slice, slice]:
    height, width = rng.integers(int(size * low), int(size * high) + 1, size=2)
    row, column = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
    return slice(row, row + height), slice(column, column + width)


def in_paint(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Up to 5 boxes (a sixth to a third of the side) filled with uniform noise."""
    painted = image.copy()
    for count in range(5):
        if count and rng.random() >= 0.95:
            break
        rows, columns = _box(rng, image.shape[0], 1 / 6, 1 / 3)
        painted[rows, columns] = rng.random((rows.stop - rows.start, columns.stop - columns.start))
    return painted


def out_paint(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uniform noise everywhere but up to 4 boxes (3/7 to 4/7 of the side) of the original."""
    painted = rng.random(image.shape).astype(image.dtype)
    for count in range(4):
        if count and rng.random() >= 0.95:
            break
        rows, columns = _box(rng, image.shape[0], 3 / 7, 4 / 7)
        painted[rows, columns] = image[rows, columns]
    return painted


def corrupt(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Models Genesis' corruption of a [0, 1] slice (H, W)."""
    if rng.random() < NONLINEAR_RATE:
        image = nonlinear_intensity(image, rng)
    if rng.random() < SHUFFLE_RATE:
        image = shuffle_local_pixels(image, rng)
    if rng.random() < PAINT_RATE:
        image = in_paint(image, rng) if rng.random() < INPAINT_RATE else out_paint(image, rng)
    return image.astype(np.float32)


def restoration_batch(images: np.ndarray, indices, seed: int, step: int) -> dict:
    """(corrupted, clean) inputs and targets of pool slices `indices`, flipped at random; a pure
    function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    clean, corrupted = [], []
    for index in indices:
        image = images[index]
        image = image[:, ::-1] if rng.random() < 0.5 else image
        image = image[::-1, :] if rng.random() < 0.5 else image
        clean.append(image)
        corrupted.append(corrupt(np.ascontiguousarray(image), rng))
    return {"image": np.stack(corrupted)[..., None], "target": np.stack(clean)[..., None].astype(np.float32)}


def pool_images(config) -> np.ndarray:
    """The unlabelled pool at `data.image_size`, window-matched to the labelled training slices, in [0, 1]."""
    from rdunet_jax import datasets, input_pipeline

    source = datasets.load_source(config.data, "unlabelled")
    return np.stack(
        [
            input_pipeline.preprocess(source[index], config.data.image_size)["image"][..., 0]
            for index in range(len(source))
        ]
    )


def make_step():
    import jax
    import jax.numpy as jnp

    @jax.jit
    def step(state, batch):
        dropout_key = jax.random.fold_in(state.dropout_key, state.step)

        def loss_fn(params):
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats},
                batch["image"],
                train=True,
                rngs={"dropout": dropout_key},
                mutable=["batch_stats"],
            )
            return jnp.mean((jax.nn.sigmoid(logits.astype(jnp.float32)) - batch["target"]) ** 2), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"]), loss

    return step


def pretrain(config, workdir: pathlib.Path, epochs: int) -> dict:
    """Trains `config.model` to restore the pool for `epochs` and saves it as `workdir`'s `latest`
    checkpoint (what `model_init` reads)."""
    from rdunet_jax import checkpoints, models, steps, train

    images = pool_images(config)
    steps_per_epoch = len(images) // config.batch_size
    model = models.build_model(config.model)
    state = steps.create_train_state(config, model, steps_per_epoch)
    step_function = make_step()
    order_rng = np.random.default_rng(config.seed)
    log, started = [], time.perf_counter()
    for epoch in range(epochs):
        order = order_rng.permutation(len(images))
        losses = []
        for position in range(steps_per_epoch):
            indices = order[position * config.batch_size : (position + 1) * config.batch_size]
            batch = restoration_batch(images, indices, config.seed, epoch * steps_per_epoch + position)
            state, loss = step_function(state, batch)
            losses.append(loss)
        record = {
            "epoch": epoch + 1,
            "loss": float(np.mean(np.asarray(losses))),
            "seconds": time.perf_counter() - started,
        }
        log.append(record)
        print(
            f"epoch {epoch + 1}/{epochs}: restoration loss {record['loss']:.5f} ({record['seconds']:.0f} s)",
            flush=True,
        )
    run_checkpoints = checkpoints.RunCheckpoints(workdir / "checkpoints")
    meta = train.new_meta(config) | {"epoch": epochs}
    run_checkpoints.save("latest", int(state.step), state, meta)
    run_checkpoints.wait()
    run_checkpoints.close()
    summary = {"pool_slices": len(images), "epochs": epochs, "steps": int(state.step), "log": log}
    common.save_json(summary, str(workdir / "pretraining.json"))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", default="../shared/data", help="holds covid-semiseg/")
    parser.add_argument(
        "--workdir", required=True, help="the pretrained run's folder (for --config.model_init)"
    )
    parser.add_argument("--config", default="configs/semiseg.py", help="the model and image size to pretrain")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    args = parser.parse_args()
    overrides = [
        f"data.manual_dir={pathlib.Path(args.data_root) / 'covid-semiseg'}",
        "data.unlabelled_intensity_matching=window",
        *args.set,
    ]
    config = common.load_config(args.config, overrides)
    workdir = pathlib.Path(args.workdir)
    if (workdir / "checkpoints").exists():
        raise SystemExit(f"--workdir: {workdir} already holds checkpoints; choose an empty folder")
    pretrain(config, workdir, args.epochs)


if __name__ == "__main__":
    main()
