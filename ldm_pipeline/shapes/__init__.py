"""The synthetic "shapes" data set and its tokenizer: what the bundled model is trained and judged on.

Training, evaluation and the random-component builders import it; it imports nothing of theirs.
"""

from .dataset import ShapesDataset, render, star_corners, write_image_folder
from .scenes import (BACKGROUND, COLOURS, CORNERS, EVAL_KINDS, EXTRA_SHAPES, HELD_OUT_PAIRS, IMAGE_SIZE, JITTER,
                     MIN_GAP_PIXELS, OBJECT_CHANCES, PARTIAL_NOUN, POSITION_BOXES, POSITIONS, SHAPES, SIZE_PROBS,
                     SIZES, SPLITS, STAR_INNER, SUPERSAMPLE, Scene, ShapeObject, allowed_pairs, caption,
                     composed_caption, eval_prompts, eval_scenes, new_shape_scenes, object_chances, parse_caption,
                     partial_caption, sample_scene, scene_regions, unplaced_caption)
