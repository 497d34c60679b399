"""Getting components: diffusers model folders, local or from the Hub (`folders`), original
single-file checkpoints (`single_file`), and random-weight components for tests (`random_components`).
"""

from .folders import ModelFileError, ModelNotFoundError
