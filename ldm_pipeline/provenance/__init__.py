"""Where an image came from: its recipe (`recipes`), written into and read from PNGs (`png`),
A1111's infotext (`infotext`), weight and model hashes (`hashes`), and drawing it again (`reproduce`).
"""

from .png import read_recipe, read_recipes, write_png
from .recipes import Recipe
