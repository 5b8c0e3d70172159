#!/usr/bin/env python3
"""Image decoding fixtures (needs Pillow and pypng): every PNG and JPEG variant the readers must handle, with the
pixels PIL decodes for them, plus damaged files.

    /opt/torchvenv/bin/python tools/gen_image_fixtures.py

Writes Tests/HRHFTests/Fixtures/images/: NAME.png / NAME.jpg and expected.safetensors holding
NAME/rgb (H x W x 3, as PIL's convert("RGB") gives) or NAME/index (H x W raw values).
"""
import os

from fixture_io import save_safetensors

import numpy as np
from PIL import Image

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "HRHFTests", "Fixtures", "images")


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(0)
    h, w = 13, 17
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    grey = rng.integers(0, 256, (h, w), dtype=np.uint8)
    expected = {}

    def png(name, image, **kw):
        path = os.path.join(OUT, name + ".png")
        image.save(path, **kw)
        expected[name + "/rgb"] = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)

    png("rgb", Image.fromarray(rgb))
    png("rgba", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    png("grey", Image.fromarray(grey, "L"))
    png("grey_alpha", Image.fromarray(np.dstack([grey, alpha]), "LA"))
    # PIL cannot write interlaced PNGs; pypng (pip install pypng) can.
    import png as pypng

    with open(os.path.join(OUT, "interlaced.png"), "wb") as f:
        pypng.Writer(w, h, greyscale=False, interlace=True).write(f, rgb.reshape(h, w * 3).tolist())
    expected["interlaced/rgb"] = np.asarray(Image.open(os.path.join(OUT, "interlaced.png")).convert("RGB"), dtype=np.float32)
    assert (expected["interlaced/rgb"] == rgb).all()
    grey16 = (rng.integers(0, 65536, (h, w))).astype(np.uint16)
    with open(os.path.join(OUT, "grey16.png"), "wb") as f:
        pypng.Writer(w, h, greyscale=True, bitdepth=16).write(f, grey16.tolist())
    expected["grey16/index"] = grey16.astype(np.float32)
    expected["grey16/rgb"] = np.repeat((grey16 >> 8).astype(np.float32)[:, :, None], 3, axis=2)
    labels = rng.integers(0, 21, (h, w), dtype=np.uint8)
    labels[0, :5] = 255
    pal = Image.fromarray(labels, "P")
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    pal.putpalette(palette)
    pal.save(os.path.join(OUT, "palette.png"))
    expected["palette/index"] = labels.astype(np.float32)
    expected["palette/rgb"] = np.asarray(Image.open(os.path.join(OUT, "palette.png")).convert("RGB"), dtype=np.float32)
    expected["grey/index"] = grey.astype(np.float32)

    for name, kw, mode in [("baseline", {"quality": 90}, "RGB"), ("progressive", {"quality": 90, "progressive": True}, "RGB"),
                           ("greyscale", {"quality": 90}, "L")]:
        path = os.path.join(OUT, name + ".jpg")
        Image.fromarray(rgb if mode == "RGB" else grey, mode).save(path, **kw)
        expected[name + "/rgb"] = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)

    # Damaged files.
    with open(os.path.join(OUT, "rgb.png"), "rb") as f:
        data = f.read()
    with open(os.path.join(OUT, "truncated.png"), "wb") as f:
        f.write(data[: len(data) * 2 // 3])
    with open(os.path.join(OUT, "baseline.jpg"), "rb") as f:
        data = f.read()
    with open(os.path.join(OUT, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(OUT, "not_an_image.png"), "wb") as f:
        f.write(b"hello, this is text")
    save_safetensors(os.path.join(OUT, "expected.safetensors"), expected)
    print("wrote", sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
