"""Images as a user brings them, to uint8 pixels in the model's size and colour layout.

EXIF orientation applied, palette/alpha/16-bit converted, floating-point images and decompression
bombs refused; and the doubts worth a warning: an image far smaller than the model's input, or of
the opposite polarity to the training data. Imports only numpy and pillow (lazily).
"""
from __future__ import annotations

import time
import warnings

import numpy as np

from device.integrity import DeviceError

MAX_IMAGE_PIXELS = 50_000_000
# The files a folder is scanned for. Pillow's own list (Image.registered_extensions()) imports all of
# its ~50 format plugins, 160 ms of a runner's cold start for one PNG; a file of another format Pillow
# reads can still be passed by name.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".tif", ".tiff",
                              ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".tga", ".pcx", ".sgi", ".psd",
                              ".avif", ".jp2", ".j2k", ".qoi"})


# Training data whose polarity is known: MNIST and scikit-learn's digits are light strokes on black.
# A metadata "polarity" in preprocess overrides this table (keyed by the metadata's dataset name).
POLARITY = {"mnist": "light-on-dark", "digits": "light-on-dark"}
# An image whose side is below this fraction of the model's is upscaled so much that little is left.
SMALL_FRACTION = 0.5


def load_image(path, preprocess: dict, timings: dict | None = None) -> np.ndarray:
    """Any image Pillow reads, to uint8 (H, W, C) in the model's size and colour layout."""
    return read_image(path, preprocess, timings=timings)[0]


def read_image(source, preprocess: dict, name: str | None = None,
               timings: dict | None = None) -> tuple[np.ndarray, dict]:
    """(uint8 (H, W, C) pixels in the model's size and layout, facts about the original image).

    `source` is a path or the bytes of an image (stdin). EXIF orientation is applied first, as
    phones and cameras store many photos sideways with a tag that says how to turn them upright.
    With `timings`, the seconds spent decoding and resizing are appended to its "decode" and
    "resize" lists (the runner's bench reports them apart from invoke).
    """
    import io

    from PIL import Image, ImageOps

    name = name or str(source)
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    # The filter the model was trained with (metadata's preprocess "resize"); older bundles used bilinear.
    # Pillow before 9.1 (Debian bullseye's python3-pil) has the filters on Image itself.
    resample = getattr(getattr(Image, "Resampling", Image), str(preprocess.get("resize", "bilinear")).upper())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            t0 = time.perf_counter()
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                img.load()
                orientation = img.getexif().get(0x0112, 1)
                img = ImageOps.exif_transpose(img)
                size = img.size
                if img.mode == "F":
                    raise DeviceError(f"{name}: a floating-point image, whose values have no set range (0..1? "
                                      "0..255?); save it as an 8- or 16-bit image")
                img = _to_mode(img, preprocess["channels"])
                t1 = time.perf_counter()
                img = img.resize((preprocess["width"], preprocess["height"]), resample)
                arr = np.asarray(img, dtype=np.uint8)
            if timings is not None:
                timings.setdefault("decode", []).append(t1 - t0)
                timings.setdefault("resize", []).append(time.perf_counter() - t1)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DeviceError(f"{name}: image is too large ({e}); pass an image under {MAX_IMAGE_PIXELS} pixels")
    except FileNotFoundError:
        raise DeviceError(f"{name}: no such image file")
    except IsADirectoryError:
        raise DeviceError(folder_error(name, source))
    except DeviceError:
        raise
    except Exception as e:  # Pillow's decoders on damaged files raise OSError, ValueError, TypeError, struct.error...
        raise DeviceError(f"{name}: not a readable image ({type(e).__name__}: {e}); pass a PNG, JPEG or other "
                          "Pillow format")
    arr = arr.reshape(preprocess["height"], preprocess["width"], preprocess["channels"])
    return arr, {"width": size[0], "height": size[1], "exif_orientation": orientation}


def folder_error(name: str, folder) -> str:
    """Why a folder gave no image: empty, or it holds class folders (an image-folder dataset) to pass one by one."""
    from pathlib import Path

    try:
        subfolders = sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        subfolders = []
    if not subfolders:
        return f"{name}: is a folder with no image files in it"
    shown = " ".join(str(p) for p in subfolders[:3]) + (" ..." if len(subfolders) > 3 else "")
    return (f"{name}: holds {len(subfolders)} folder(s) and no image files; classify reads only the images directly "
            f"in a folder: pass the folders themselves ({shown}), or {name.rstrip('/')}/*/ in a shell")


def image_warnings(pixels: np.ndarray, facts: dict, preprocess: dict, dataset: str | None) -> list[str]:
    """What makes a classification of this image doubtful: far too small, or the opposite polarity."""
    out = []
    h, w = preprocess["height"], preprocess["width"]
    if facts["width"] < SMALL_FRACTION * w or facts["height"] < SMALL_FRACTION * h:
        out.append(f"the image is {facts['width']}x{facts['height']}, far smaller than the model's {w}x{h} input; "
                   "it was upscaled and the result means little")
    polarity = preprocess.get("polarity") or POLARITY.get(dataset or "")
    if polarity == "light-on-dark" and _background(pixels) > 127:
        out.append(f"the image looks dark on a light background, but the model was trained on light strokes on "
                   f"a dark background ({dataset}); pass --invert to flip it")
    return out


def _background(pixels: np.ndarray) -> float:
    """The median of the one-pixel border: the background of a centred digit or object."""
    g = pixels.mean(axis=-1) if pixels.ndim == 3 else pixels
    border = np.sort(np.concatenate([g[0], g[-1], g[1:-1, 0], g[1:-1, -1]]), axis=None)
    # The median by hand: numpy.median's NaN check imports numpy.ma, 30-120 ms of a cold start.
    return (float(border[(border.size - 1) // 2]) + float(border[border.size // 2])) / 2


def _to_mode(img, channels: int):
    # Palette, alpha and 16-bit images are converted, not refused: flatten alpha onto black (the
    # background of MNIST-style training digits) and scale 16-bit samples down to 8 bits.
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        # A 16-bit mode holds 16-bit samples, however dark the image. Mode I (32-bit) is what older
        # Pillows open a 16-bit PNG as and other formats an 8-bit one: only there do the values decide.
        peak = 65535.0 if img.mode != "I" or arr.max() > 255 else 255.0
        from PIL import Image
        img = Image.fromarray(np.clip(np.rint(arr * 255.0 / peak), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    # A grey or RGB PNG can make one colour transparent (a tRNS chunk): Pillow's RGBA conversion turns it
    # into alpha, flattened onto black like any other.
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("L", "RGB") and "transparency" in img.info):
        from PIL import Image
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("L" if channels == 1 else "RGB")
