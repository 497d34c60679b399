"""atomic_path and atomic_folder: the target is replaced whole or not at all."""

import pytest

from ldm_pipeline.files import atomic_folder, atomic_path, partial_name


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


def test_a_folder_is_replaced_whole_when_the_block_ends(tmp_path):
    target = tmp_path / "lora"
    target.mkdir()
    (target / "old.safetensors").write_text("old")
    with atomic_folder(target) as temporary:
        (temporary / "new.safetensors").write_text("new")
        assert temporary.parent == tmp_path and temporary.name.startswith(".")
        assert [p.name for p in target.iterdir()] == ["old.safetensors"]  # the old folder stays until the end
    assert [p.name for p in target.iterdir()] == ["new.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["lora"]  # neither the old folder nor the staging is left


def test_a_failed_folder_write_keeps_the_old_folder_and_leaves_nothing_behind(tmp_path, monkeypatch):
    import os

    target = tmp_path / "model"
    target.mkdir()
    (target / "model_index.json").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_folder(target) as temporary:
            (temporary / "model_index.json").write_text("half")
            raise RuntimeError("disk full")
    # the last rename fails after the old folder was moved aside: it is put back
    real_replace = os.replace

    def failing(source, destination):
        if ".partial" in str(source):
            raise OSError("rename failed")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_folder(target) as temporary:
            (temporary / "model_index.json").write_text("new")
    assert (target / "model_index.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
