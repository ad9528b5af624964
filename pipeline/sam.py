"""--sam: sharpness-aware minimization (Foret et al., ICLR 2021) as the training step of a compiled Keras model.

Each step first climbs from the weights w to w + e, e = rho * g / |g| (g the batch's gradient: the worst point
within radius rho to first order), takes the gradient there and applies it at w. The optimizer so prefers minima
whose whole neighbourhood has a low loss: they generalize better, and rounding the weights to int8 is a small move
inside such a neighbourhood. The images seen are the same; each batch costs a second forward and backward pass.
"""
from __future__ import annotations


def sharpness_aware(model, rho: float) -> None:
    """Make `model.fit` take SAM steps of radius `rho` (after `compile`: the step uses its loss and optimizer)."""
    import keras
    import tensorflow as tf

    def train_step(data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        weights = model.trainable_weights

        def loss_and_gradients():
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True)
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            return y_pred, loss, tape.gradient(loss, weights)

        y_pred, loss, gradients = loss_and_gradients()
        scale = rho / (tf.linalg.global_norm(gradients) + 1e-12)
        climb = [g * scale for g in gradients]
        # The climb's forward pass would move BatchNorm's statistics a second time, towards weights that are
        # never kept: the statistics the first pass left are put back.
        state = [tf.identity(v.value) for v in model.non_trainable_weights]
        for w, e in zip(weights, climb):
            w.assign_add(e)
        _, _, gradients = loss_and_gradients()
        for w, e in zip(weights, climb):
            w.assign_sub(e)
        for v, value in zip(model.non_trainable_weights, state):
            v.assign(value)
        model.optimizer.apply_gradients(zip(gradients, weights))
        for metric in model.metrics:
            if metric.name == "loss":  # the loss at the weights, as a plain step reports it
                metric.update_state(loss, sample_weight=tf.shape(x)[0])
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    model.train_step = train_step
