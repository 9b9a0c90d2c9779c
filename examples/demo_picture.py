"""Draw the small picture `make demo` gives llama4-run with --image: a sun over hills, 160 × 96 px (a 2 × 3 tile grid
for the demo's 56-px tiles, plus the global tile).

    python examples/demo_picture.py out/demo-picture.png
"""

import sys

from PIL import Image, ImageDraw


def draw(path: str) -> None:
    image = Image.new("RGB", (160, 96), (135, 190, 235))
    canvas = ImageDraw.Draw(image)
    canvas.ellipse((112, 10, 144, 42), fill=(250, 210, 60))
    canvas.polygon([(0, 96), (0, 60), (50, 40), (100, 70), (160, 50), (160, 96)], fill=(70, 140, 70))
    image.save(path)


if __name__ == "__main__":
    draw(sys.argv[1])
