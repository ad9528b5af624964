"""Cross-layer equalization (Nagel et al., 2019) for the accuracy guard.

Rescales consecutive weighted layers through ReLU, BatchNorm, pooling and Flatten so that each
channel uses its int8 range well, while the float function stays the same: the remedy that keeps
every layer int8, tried before anything is left in float.
"""
from __future__ import annotations

import numpy as np


def equalize(model, images: np.ndarray, sweeps: int = 50):
    """Cross-layer equalization (Nagel et al., 2019) of a Sequential model; returns (copy or None, record).

    For weighted layers A -> B joined only by ReLU, BatchNorm after A, pooling and Flatten, dividing
    A's output channel i by s_i and multiplying B's matching inputs by s_i leaves the function
    unchanged: ReLU and pooling are positively homogeneous, BatchNorm follows by scaling its mean and
    beta, and after Flatten (NHWC) channel i is every C-th input row of the Dense. s_i = sqrt(rA_i / rB_i)
    gives both the same weight range (BatchNorm folded in, as the converter will fold it), so no
    channel is tiny next to another in a shared int8 scale. ReLU6 is not homogeneous: a channel that
    reaches the clip on `images` keeps s_i = 1, the others get s_i >= max_i / 6 so they never reach it.
    """
    import keras

    if not isinstance(model, keras.Sequential):
        return None, {"status": "not_applicable", "reason": "equalization walks Sequential models only"}
    eq = keras.models.clone_model(model)
    eq.set_weights(model.get_weights())
    pairs = _pairs(eq)
    if not pairs:
        return None, {"status": "not_applicable", "reason": "no consecutive conv/dense pairs joined by ReLU or pooling"}
    clipped = [p for p in pairs if np.isfinite(p["clip"])]
    maxima = {}
    if clipped:  # per-channel maxima where the clip applies, tracked through the scaling below
        probe = keras.Model(eq.inputs, [p["clip_at"].output for p in clipped])
        outs = probe.predict(images, batch_size=256, verbose=0)
        for p, out in zip(clipped, outs if len(clipped) > 1 else [outs]):
            maxima[id(p)] = out.reshape(-1, out.shape[-1]).max(axis=0).astype(np.float64)
    # Channels that reach the ReLU6 clip on `images`: they keep s = 1.
    held = sum(int((maxima[id(p)] >= p["clip"] * (1 - 1e-6)).sum()) for p in clipped)
    sweep = 0  # sweeps done, reported below
    for _ in range(sweeps):
        sweep += 1
        worst = 0.0
        for p in pairs:
            r_a, r_b = _out_range(p["a"], p["a_bn"]), _in_range(p["b"], p["b_bn"], p["channels"])
            s = np.sqrt(np.where((r_a > 0) & (r_b > 0), r_a / np.where(r_b > 0, r_b, 1), 1.0))
            if id(p) in maxima:
                m = maxima[id(p)]
                s = np.where(m >= p["clip"] * (1 - 1e-6), 1.0, np.maximum(s, m / p["clip"]))
                maxima[id(p)] = m / s
            _scale(p, s)
            worst = max(worst, float(np.abs(np.log(s)).max()))
        if worst < 1e-3:
            break
    return eq, {"pairs": [f"{p['a'].name} -> {p['b'].name}" for p in pairs], "sweeps": sweep,
                "relu6_channels_held": held}


def _pairs(model) -> list[dict]:
    from keras import layers as L

    weighted = (L.Conv2D, L.DepthwiseConv2D, L.Dense)
    homogeneous = (L.MaxPooling2D, L.AveragePooling2D, L.GlobalAveragePooling2D, L.GlobalMaxPooling2D,
                   L.Dropout, L.ZeroPadding2D)
    seq, pairs = model.layers, []
    for i, a in enumerate(seq):
        if not isinstance(a, weighted) or getattr(a, "depth_multiplier", 1) != 1:
            continue
        act = a.get_config().get("activation", "linear")
        clip, clip_at, bn, flat = _CLIP.get(act), a, None, False
        if clip is None:  # softmax, tanh, ...: not homogeneous
            continue
        for layer in seq[i + 1:]:
            if isinstance(layer, weighted):
                channels = len(_out_range(a, None))
                b_in = layer.kernel.shape[0] if isinstance(layer, L.Dense) else layer.kernel.shape[2]
                if b_in == channels or (flat and isinstance(layer, L.Dense) and b_in % channels == 0):
                    after = seq[seq.index(layer) + 1] if layer is not seq[-1] else None
                    b_bn = after if isinstance(after, L.BatchNormalization) else None
                    pairs.append({"a": a, "a_bn": bn, "b": layer, "b_bn": b_bn, "channels": channels,
                                  "clip": clip, "clip_at": clip_at})
                break
            if isinstance(layer, L.BatchNormalization) and layer is seq[i + 1] and act == "linear":
                bn = layer
            elif isinstance(layer, (L.ReLU, L.Activation)) and _layer_clip(layer) is not None:
                clip, clip_at = min(clip, _layer_clip(layer)), layer
            elif isinstance(layer, L.Flatten):
                flat = True
            elif not isinstance(layer, homogeneous):
                break
    return pairs


_CLIP = {"linear": np.inf, "relu": np.inf, "relu6": 6.0}  # positively homogeneous up to the clip


def _layer_clip(layer) -> float | None:
    cfg = layer.get_config()
    if "activation" in cfg:
        return _CLIP.get(cfg["activation"])
    if cfg.get("negative_slope", 0) or cfg.get("threshold", 0):
        return None
    return np.inf if cfg.get("max_value") is None else float(cfg["max_value"])


def _bn_gain(bn) -> np.ndarray:
    gamma = np.ones(bn.moving_variance.shape) if bn.gamma is None else np.asarray(bn.gamma)
    return np.abs(gamma / np.sqrt(np.asarray(bn.moving_variance, np.float64) + bn.epsilon))


def _out_range(layer, bn) -> np.ndarray:
    """Largest |weight| of each output channel, BatchNorm folded in."""
    k = np.abs(np.asarray(layer.kernel, np.float64))
    r = k.max(axis=(0, 1, 3)) if k.ndim == 4 and _is_depthwise(layer) else k.reshape(-1, k.shape[-1]).max(axis=0)
    return r * _bn_gain(bn) if bn is not None else r


def _in_range(layer, bn, channels: int) -> np.ndarray:
    """Largest |weight| reading each input channel (every C-th row of a Dense after Flatten)."""
    k = np.abs(np.asarray(layer.kernel, np.float64))
    if bn is not None:
        k = k * _bn_gain(bn).reshape(k.shape[-2:] if _is_depthwise(layer) else -1)
    if k.ndim == 2:
        return k.reshape(-1, channels, k.shape[-1]).max(axis=(0, 2))
    return k.max(axis=(0, 1, 3))


def _is_depthwise(layer) -> bool:
    from keras import layers as L

    return isinstance(layer, L.DepthwiseConv2D)


def _scale(p: dict, s: np.ndarray) -> None:
    a, b, bn = p["a"], p["b"], p["a_bn"]
    a.kernel.assign((np.asarray(a.kernel) / (s[:, None] if _is_depthwise(a) else s)).astype(np.float32))
    for var in (a.bias if a.use_bias else None, bn and bn.moving_mean, bn and bn.beta):
        if var is not None:
            var.assign((np.asarray(var) / s).astype(np.float32))
    k = np.asarray(b.kernel)
    if k.ndim == 2:  # Dense: rows are channel-interleaved after Flatten
        k = (k.reshape(-1, len(s), k.shape[-1]) * s[None, :, None]).reshape(k.shape)
    else:
        k = k * s[None, None, :, None]
    b.kernel.assign(k.astype(np.float32))
