"""atomic_path: the target is replaced whole or not at all."""

import pytest

from ldm_pipeline.files import atomic_path, partial_name


def test_the_target_is_replaced_when_the_block_ends(tmp_path):
    target = tmp_path / "out" / "cache.json"  # a missing folder is made
    with atomic_path(target) as temporary:
        assert temporary.parent == target.parent and temporary.name.startswith(".") and temporary.suffix == ".json"
        temporary.write_text("new")
        assert not target.exists()  # nothing at the target until the write is complete
    assert target.read_text() == "new" and [p.name for p in target.parent.iterdir()] == ["cache.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "image.png"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target, sync=True) as temporary:
            temporary.write_text("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and not partial_name(target).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]
