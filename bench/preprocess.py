"""Image quality and speed of the loader's CLIP preprocessing against open_clip's own, on the shipped photos.

The reference is open_clip's eval transform for the tower (`open_clip.image_transform(size)`: torchvision
`Resize(size, bicubic, antialias)` + `CenterCrop(size)` on the PIL image, then `ToTensor`; `Normalize` left
out, the model applies it to uint8 pixels itself), read back in uint8 units. Paths compared with it, per
photo of assets/images (16, 172 to 1000 px):
  loader      `kosmos.image.decode_image` on the original file (what training does with unsized shards)
  256 shards  the converters' default (`--image-size 256`, JPEG q90), then the loader's resize
  pre-sized   `--image-size 224 --crop center` (JPEG q90; q95 below it), the loader only decodes
and prints the largest and mean absolute pixel difference (uint8 levels; mean over all pixels of all photos,
and the worst photo's mean), then ms per photo of the reference and of the loader, one thread.

    python bench/preprocess.py [--image-size 224]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reference(size: int):
    """open_clip's eval transform without `Normalize`: PIL image -> (3, size, size) uint8 (as int32)."""
    import open_clip
    import torchvision.transforms as T

    tf = open_clip.image_transform(size, is_train=False)
    to_pixels = T.Compose([t for t in tf.transforms if not isinstance(t, T.Normalize)])
    return lambda image: (to_pixels(image) * 255).round().int()


def differences(paths, size: int, ref, convert=None) -> tuple[int, float, float]:
    """(max, mean, worst photo's mean) |path - reference| in uint8 levels; `convert`: bytes -> shard bytes."""
    from PIL import Image

    from kosmos.image import decode_image

    worst, total, n, means = 0, 0.0, 0, []
    for p in paths:
        data = p.read_bytes()
        with Image.open(p) as im:
            r = ref(im)
        d = (decode_image(convert(data) if convert else data, size).int() - r).abs()
        worst, total, n = max(worst, int(d.max())), total + float(d.sum()), n + d.numel()
        means.append(float(d.float().mean()))
    return worst, total / n, max(means)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=224)
    args = ap.parse_args(argv)

    import torch
    from PIL import Image

    from kosmos.data_tools.images import ImageOptions, normalize_image
    from kosmos.image import decode_image

    torch.set_num_threads(1)  # as in a DataLoader worker
    size = args.image_size
    paths = sorted((ROOT / "assets" / "images").glob("*.jpg"))
    ref = reference(size)

    def shard(**kw):
        opts = ImageOptions(**kw)
        return lambda data: normalize_image(data, opts)[0]

    rows = [
        ("loader on the original files", None),
        ("256 shards (converter default) + loader resize", shard(image_size=256)),
        (f"pre-sized {size} --crop center, q90, decode only", shard(image_size=size, crop="center")),
        (f"pre-sized {size} --crop center, q95, decode only",
         shard(image_size=size, crop="center", jpeg_quality=95)),
    ]
    print(f"CLIP preprocessing vs open_clip's transform, {len(paths)} photos, {size} px, uint8 levels")
    print(f"  {'path':52s} {'max':>5s} {'mean':>7s} {'worst photo mean':>17s}")
    for name, convert in rows:
        mx, mean, worst_mean = differences(paths, size, ref, convert)
        print(f"  {name:52s} {mx:5d} {mean:7.3f} {worst_mean:17.3f}")

    datas = [p.read_bytes() for p in paths]

    def ref_once():
        import io

        for d in datas:
            with Image.open(io.BytesIO(d)) as im:
                ref(im)

    def ours_once():
        for d in datas:
            decode_image(d, size)

    for name, fn in (("open_clip transform (PIL decode + resize + crop)", ref_once),
                     ("loader decode_image", ours_once)):
        fn()  # warm
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        print(f"  {name:52s} {(time.perf_counter() - t0) / (5 * len(datas)) * 1e3:6.2f} ms/photo")


if __name__ == "__main__":
    main()
