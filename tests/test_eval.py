"""Evaluation: FID's maths and sanity, CLIP score with the bundled CLIP, feature extractors, reports."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import scipy.stats
import torch

from ldm_pipeline.apps.cli import main
from ldm_pipeline.evaluation import report as rep
from ldm_pipeline.evaluation.clip import Clip, Preprocess, resize
from ldm_pipeline.evaluation.features import ClipFeatures, InceptionFeatures, make_extractor
from ldm_pipeline.evaluation.fid import FeatureStats, cached_stats, feature_stats, fid, frechet_distance
from ldm_pipeline.shapes import COLOURS, POSITIONS, Scene, ShapeObject, caption, render, sample_scene


@pytest.fixture(scope="module")
def clip():
    return Clip.from_pretrained()


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(1)
    return [sample_scene(rng, "any", 0.3) for _ in range(60)]


# -- FID ---------------------------------------------------------------------------------------

def test_fid_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mean_a, mean_b, var_a, var_b = rng.normal(size=6), rng.normal(size=6), rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = frechet_distance(FeatureStats(mean_a, np.diag(var_a), 10), FeatureStats(mean_b, np.diag(var_b), 10))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_matches_scipy_on_full_covariances_and_is_symmetric():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 12)), rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) + 0.5
    sa, sb = feature_stats(a), feature_stats(b)
    root = scipy.linalg.sqrtm(sa.cov @ sb.cov).real
    expected = np.sum((sa.mean - sb.mean) ** 2) + np.trace(sa.cov + sb.cov - 2 * root)
    assert fid(a, b) == pytest.approx(expected, rel=1e-8)
    assert fid(b, a) == pytest.approx(fid(a, b), rel=1e-10)


def test_fid_of_a_set_with_itself_is_zero_even_with_fewer_samples_than_dimensions():
    rng = np.random.default_rng(2)
    for shape in [(500, 16), (40, 128)]:  # the second has a singular covariance
        features = rng.normal(size=shape)
        assert fid(features, features) < 1e-6
        assert np.isfinite(fid(features, features + 0.1 * rng.normal(size=shape)))


def test_fid_rejects_features_of_different_sizes():
    with pytest.raises(ValueError, match="same extractor"):
        fid(np.zeros((5, 3)) + np.arange(3), np.ones((5, 4)) * np.arange(4))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.ones((1, 3)))


def test_fid_with_clip_features_grows_as_noise_is_added(clip, scenes):
    extractor = ClipFeatures(clip)
    images = [render(scene) for scene in scenes]
    real = extractor(images)
    rng = np.random.default_rng(3)
    distances = []
    for sigma in (0.0, 0.05, 0.15, 0.4):
        noisy = [PIL.Image.fromarray(np.clip(np.asarray(image) + rng.normal(0, 255 * sigma, (64, 64, 3)), 0, 255)
                                     .astype(np.uint8)) for image in images]
        distances.append(fid(real, extractor(noisy)))
    assert distances[0] < 1e-6
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


def test_real_statistics_are_cached_under_a_hash_of_images_and_extractor(tmp_path):
    calls = []

    def extractor(images):
        calls.append(len(images))
        return np.stack([np.asarray(image, dtype=np.float64).reshape(-1)[:5] for image in images])

    extractor.name = "test-features"
    images = [PIL.Image.new("RGB", (8, 8), (i * 30, 7 * i, 100)) for i in range(6)]
    first = cached_stats(images, extractor, tmp_path)
    again = cached_stats(images, extractor, tmp_path)
    assert calls == [6] and len(list(tmp_path.glob("*.npz"))) == 1
    np.testing.assert_array_equal(first.cov, again.cov)
    cached_stats(images[:-1] + [PIL.Image.new("RGB", (8, 8), "red")], extractor, tmp_path)  # changed pixels
    extractor.name = "other-features"
    cached_stats(images, extractor, tmp_path)
    assert calls == [6, 6, 6] and len(list(tmp_path.glob("*.npz"))) == 3


# -- resizing and extractors -------------------------------------------------------------------

def test_resize_is_antialiased_and_crops_the_centre():
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    small = resize(PIL.Image.fromarray(checker).convert("RGB"), 16)
    assert small.shape == (16, 16, 3) and small.dtype == np.float32
    assert np.abs(small - 0.5).max() < 0.05  # a 1-pixel checkerboard averages to grey, not to stripes
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255  # the centre square is white, the sides black
    assert resize(PIL.Image.fromarray(wide), 10).min() == 1.0


def test_preprocessing_is_read_from_the_model_folder(tmp_path, clip):
    assert clip.preprocess == Preprocess(64, (0.5,) * 3, (0.5,) * 3)  # this project's CLIP: [-1, 1]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 32, "width": 32}, "image_mean": [0.1, 0.2, 0.3], "image_std": [1, 1, 1]}))
    assert Preprocess.for_folder(tmp_path, clip.model) == Preprocess(32, (0.1, 0.2, 0.3), (1, 1, 1))
    assert Preprocess.for_folder(tmp_path / "missing", clip.model).size == clip.model.config.vision_config.image_size


class FakeInception(torch.nn.Module):
    """Stands in for the TorchScript Inception: the same call, per-channel mean and max as features."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3)), torch.full_like(x[:, :1, 0, 0], x.shape[-1])], 1)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:DeprecationWarning")  # NVIDIA ships TorchScript
def test_inception_features_call_the_torchscript_net_at_299_in_0_255(tmp_path):
    path = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(FakeInception()), str(path))
    extractor = make_extractor("inception", inception=path)
    features = extractor([PIL.Image.new("RGB", (64, 48), (255, 0, 0))] * 3)
    assert extractor.name == "inception-v3:inception.pt"
    assert features.shape == (3, 7) and features[0, 6] == 299
    np.testing.assert_allclose(features[0, :3], [255, 0, 0], atol=1e-3)


def test_missing_inception_weights_name_the_path_and_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at .*nothing.pt.*nvlabs"):
        InceptionFeatures(tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="features.*'clip' or 'inception'"):
        make_extractor("vgg")


# -- CLIP score --------------------------------------------------------------------------------

def _changed(scene: Scene, rng, what: str) -> Scene:
    """The scene with its first object in another colour, or in a free position."""
    first, *rest = scene.objects
    if what == "colour":
        first = ShapeObject(rng.choice([c for c in COLOURS if c != first.colour]), first.shape, first.position,
                            first.size, first.jitter, first.half_size)
    else:
        taken = {obj.position for obj in scene.objects}
        first = ShapeObject(first.colour, first.shape, next(p for p in POSITIONS if p not in taken), first.size,
                            first.jitter, first.half_size)
    return Scene((first, *rest))


def test_clip_score_ranks_the_matching_caption_above_a_wrong_one(clip, scenes):
    rng = np.random.default_rng(4)
    images = [render(scene) for scene in scenes]
    right = clip.score(images, [caption(scene) for scene in scenes])
    assert right.min() >= 0 and right.max() <= 100 and right.mean() > 80
    for what in ("colour", "position"):
        wrong = clip.score(images, [caption(_changed(scene, rng, what)) for scene in scenes])
        assert (right > wrong).mean() >= 0.95, what


def test_clip_score_is_100_times_the_cosine_clamped_at_zero(clip, scenes):
    images = [render(scene) for scene in scenes[:12]]
    texts = [caption(scene) for scene in scenes[6:18]]  # half of them wrong, so some cosines are negative
    cos = torch.nn.functional.cosine_similarity(clip.image_embeddings(images), clip.text_embeddings(texts)).numpy()
    assert (cos < 0).any()
    np.testing.assert_allclose(clip.score(images, texts), 100 * np.maximum(cos, 0), atol=1e-4)
    with pytest.raises(ValueError, match="one caption per image"):
        clip.score(images, texts[:3])


# -- reports -----------------------------------------------------------------------------------

class Replay:
    """A stand-in pipeline that returns given images in order: here the real renders themselves."""

    def __init__(self, images):
        self.images = list(images)

    def __call__(self, prompts, seed, progress, **kwargs):
        images, self.images = self.images[:len(prompts)], self.images[len(prompts):]
        return SimpleNamespace(images=images, num_inference_steps=50, scheduler="ddim", guidance_scale=4.0)


def test_plumbing_a_model_that_replays_the_real_images_scores_as_the_real_images(clip, tmp_path):
    """Plumbing only: each generated score is the same computation as its real counterpart, on the same images."""
    sets = rep.shapes_sets(12, seed=5)
    extractor = ClipFeatures(clip)
    references = rep.reference_stats(rep.shapes_reference(12), extractor, tmp_path)
    assert set(references) == {"seen", "held_out", "two", "three", "all"}
    report = rep.evaluate(Replay([image for s in sets for image in s.real]), sets, list(range(12)), clip, extractor,
                          references, batch_size=5)
    for scores in [*report["sets"].values(), report["all"]]:
        assert scores["correct"] == scores["strict_correct"] == 1.0 and scores["extra"] == 0
        assert scores["clip_score"] == pytest.approx(scores["clip_score_real"])
        assert scores["fid"] == pytest.approx(scores["fid_real"]) and scores["fid"] > 0
    assert report["all"]["n"] == 48 and report["features"] == extractor.name
    table = rep.markdown({**report, "model": "replay"})
    assert "| three | 12 | 100.0 % (75.8-100.0) | 100.0 % (75.8-100.0) |" in table  # 95 % Wilson intervals
    assert "| all | 48 | 100.0 % (92.6-100.0) | 100.0 % (92.6-100.0) |" in table
    assert "FID (real)" in table and "correct (strict)" in table and "95 % intervals" in table
    one = rep.markdown({**report, "settings": {"scheduler": "lcm", "num_inference_steps": 1, "guidance_scale": 1.0}})
    assert ", lcm, 1 step, guidance 1.0" in one


class MeanColour:
    """A stand-in FID extractor, each image's mean colour, so that the expected FID can be worked out here."""

    name = "mean-colour"

    def __call__(self, images):
        return np.stack([np.asarray(image, np.float64).reshape(-1, 3).mean(axis=0) for image in images])


def _fid_by_scipy(a: np.ndarray, b: np.ndarray) -> float:
    mean_a, mean_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real))


def test_a_model_that_gets_the_colour_of_4_in_12_wrong_is_scored_so(clip, tmp_path):
    from ldm_pipeline.evaluation.accuracy import scenes_for, wilson_interval

    sets, rng, wrong = rep.shapes_sets(12, seed=5), np.random.default_rng(6), 4
    drawn = {}
    for prompt_set in sets:
        scenes = scenes_for(prompt_set.name, 12, 5)
        assert [caption(scene) for scene in scenes] == prompt_set.prompts
        # the first 4 images of each set show their first object in another colour; the rest are the real renders
        drawn[prompt_set.name] = [render(_changed(scene, rng, "colour")) for scene in scenes[:wrong]] + \
            prompt_set.real[wrong:]
    extractor = MeanColour()
    references = rep.reference_stats({s.name: s.real for s in sets}, extractor, tmp_path)  # FID against the renders
    report = rep.evaluate(Replay([image for s in sets for image in drawn[s.name]]), sets, list(range(12)), clip,
                          extractor, references, batch_size=5)
    for prompt_set in sets:
        scores, images = report["sets"][prompt_set.name], drawn[prompt_set.name]
        assert scores["correct"] == scores["colour"] == scores["strict_correct"] == pytest.approx(8 / 12)
        assert scores["interval_95"]["strict_correct"] == pytest.approx(wilson_interval(8, 12))
        assert scores["verdicts"] == {"correct": "0000" + "1" * 8, "strict_correct": "0000" + "1" * 8}
        assert scores["strict_shape"] == 1.0
        assert scores["shape"] == scores["position"] == 1.0 and scores["extra"] == 0
        assert scores["clip_score"] == pytest.approx(clip.score(images, prompt_set.prompts).mean(), rel=1e-6)
        assert scores["clip_score"] < scores["clip_score_real"] - 1
        assert scores["fid_real"] == pytest.approx(0, abs=1e-9)  # the real images are the reference
        expected = _fid_by_scipy(extractor(images), extractor(prompt_set.real))
        assert expected > 1 and scores["fid"] == pytest.approx(expected, rel=1e-6)
    everything = [image for s in sets for image in drawn[s.name]]
    assert report["all"]["correct"] == report["all"]["strict_correct"] == pytest.approx(32 / 48)
    assert report["all"]["n"] == 48 and report["all"]["interval_95"]["correct"] == pytest.approx(wilson_interval(32, 48))
    assert report["all"]["fid"] == pytest.approx(
        _fid_by_scipy(extractor(everything), extractor([image for s in sets for image in s.real])), rel=1e-6)


def test_seeds_prompts_and_real_folders_are_checked(tmp_path):
    assert rep.parse_seeds("7", 3) == [7, 8, 9]
    assert rep.parse_seeds("2-5", 3) == [2, 3, 4]
    assert rep.parse_seeds("9,1,4", 3) == [9, 1, 4]
    assert rep.seeds_text([9, 1, 4]) == "9,1,4" and rep.parse_seeds(rep.seeds_text(list(range(3, 9))), 6) == [3, 4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="seeds.*at least n = 4"):
        rep.parse_seeds("1,2", 4)
    with pytest.raises(ValueError, match="seeds.*'x'"):
        rep.parse_seeds("x", 4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    assert rep.file_set(prompts, 3).prompts == ["a cat", "a dog", "a cat"]
    with pytest.raises(ValueError, match="prompts.*one prompt per line"):
        rep.file_set(tmp_path / "none.txt", 3)
    with pytest.raises(ValueError, match="real.*at least 2 images"):
        rep.folder_images(tmp_path)


def _eval(tmp_path, name, *extra):
    out = tmp_path / f"{name}.json"
    args = ["eval", "--n", "3", "--steps", "3", "--exclude-training", "0", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out), *extra]
    assert main(args) == 0
    return out


def test_ldm_eval_writes_a_reproducible_report(tmp_path, capsys):
    first, second = _eval(tmp_path, "a", "--seeds", "10"), _eval(tmp_path, "b", "--seeds", "10-12")
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a.pop("timing") and b.pop("timing")
    assert a == b and a["seeds"] == "10-12" and a["settings"]["num_inference_steps"] == 3
    assert set(a["sets"]) == {"seen", "held_out", "two", "three"}
    assert {"fid", "fid_real", "clip_score", "position", "strict_correct"} <= set(a["all"])
    assert "| held_out | 3 |" in first.with_suffix(".md").read_text()
    assert "strict_by_pair" in a["sets"]["held_out"] and "strict_by_pair" not in a["sets"]["two"]
    assert sum(g["n"] for k, g in a["sets"]["held_out"]["strict_by_pair"].items() if k.startswith("size ")) == 3
    assert "Strict by pair and size, held_out: " in first.with_suffix(".md").read_text()
    assert (tmp_path / "a-two.png").is_file() and (tmp_path / "a-three.png").is_file()
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 5  # four kinds and all: computed once, then reused
    only = json.loads(_eval(tmp_path, "c", "--kinds", "three", "seen").read_text())
    assert list(only["sets"]) == ["three", "seen"]


def test_ldm_eval_fast_names_the_lora_it_drew_with(tmp_path):
    report = json.loads(_eval(tmp_path, "f", "--fast", "--kinds", "seen").read_text())
    assert report["fast"] and Path(report["fast_lora"]).name == "shapes-lcm-lora"
    assert report["settings"]["scheduler"] == "lcm" and report["settings"]["guidance_scale"] == 1.0
    assert "with the fast LoRA `" in (tmp_path / "f.md").read_text()
    plain = json.loads(_eval(tmp_path, "p", "--kinds", "seen").read_text())
    assert not plain["fast"] and plain["fast_lora"] is None


def test_ldm_eval_sweep_writes_a_table_and_a_plot(tmp_path):
    out = _eval(tmp_path, "sweep", "--sweep", "--sweep-steps", "2", "3", "--sweep-schedulers", "ddim", "euler",
                "--sweep-guidance", "4")
    reports = json.loads(out.read_text())
    assert [(r["settings"]["scheduler"], r["settings"]["num_inference_steps"]) for r in reports] == [
        ("ddim", 2), ("ddim", 3), ("euler", 2), ("euler", 3)]
    assert out.with_suffix(".md").read_text().count("\n| euler |") == 2
    plot = PIL.Image.open(out.with_suffix(".png"))
    assert plot.height > plot.width > 300  # three measures over one guidance scale


def test_ldm_eval_checks_arguments_before_loading(tmp_path, capsys):
    assert main(["eval", "--n", "1", "--out", str(tmp_path / "r.json")]) == 2
    assert "--n: got 1" in capsys.readouterr().err
    assert main(["eval", "--out", str(tmp_path / "r.txt")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["eval", "--kinds", "two", "four", "--out", str(tmp_path / "r.json")]) == 2
    assert "--kinds: got 'two four'; expected some of seen held_out two three" in capsys.readouterr().err


def test_any_clip_model_folder_loads_with_its_own_preprocessing(tmp_path, tokenizer):
    from ldm_pipeline.training.clip import ClipConfig, build_clip
    from ldm_pipeline.training.loop import LoopConfig

    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    model = build_clip(ClipConfig(loop=LoopConfig(output_dir=str(tmp_path)), image_size=32, text=tiny,
                                  vision={**tiny, "patch_size": 8}, projection_dim=16), tokenizer)
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": 32, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    user = Clip.from_pretrained(tmp_path / "clip")
    assert user.preprocess == Preprocess(32, (0.5,) * 3, (0.25,) * 3)
    assert user.name.startswith(str(tmp_path / "clip") + "@")
    images = [PIL.Image.new("RGB", (48, 40), colour) for colour in ("red", "blue")]
    assert user.score(images, ["a red circle in the top left", "a photo of a cat"]).shape == (2,)
    assert ClipFeatures(user)(images).shape == (2, 16)
    with pytest.raises(ValueError, match="clip.*CLIPModel folder"):
        Clip.from_pretrained(tmp_path)


def test_a_hub_clip_that_cannot_be_reached_gives_a_clear_error(tmp_path):
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "ldm_pipeline", "eval", "--clip", "some-owner/some-clip", "--n", "2",
                          "--exclude-training", "0", "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert run.returncode == 2
    assert "cannot download 'some-owner/some-clip'" in run.stderr and "HF_HUB_OFFLINE=1" in run.stderr
    assert not (tmp_path / "r.json").exists()


# -- paired comparison -------------------------------------------------------------------------

def test_mcnemar_p_is_scipys_exact_binomial_test_on_the_discordant_images():
    from ldm_pipeline.evaluation.compare import mcnemar_p

    for only_a, only_b in [(0, 0), (0, 1), (3, 3), (2, 9), (12, 4), (0, 20), (40, 55)]:
        expected = 1.0 if only_a + only_b == 0 else scipy.stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert mcnemar_p(only_a, only_b) == pytest.approx(expected, rel=1e-9)


def _report(seeds="0-5", digest="abc", correct="111100", strict="110100"):
    return {"seeds": seeds, "sets": {"held_out": {"n": len(correct), "prompts_digest": digest,
                                                  "verdicts": {"correct": correct, "strict_correct": strict}}}}


def test_compare_counts_the_images_only_one_report_gets_right(tmp_path):
    from ldm_pipeline.evaluation import compare as paired

    rows = paired.compare(_report(strict="110100"), _report(strict="011111"))
    strict = next(row for row in rows if row["measure"] == "strict_correct")
    assert (strict["only_a"], strict["only_b"], strict["n"]) == (1, 3, 6)  # image 0 for A; 2, 4 and 5 for B
    assert strict["a"] == pytest.approx(3 / 6) and strict["b"] == pytest.approx(5 / 6)
    assert strict["p"] == pytest.approx(scipy.stats.binomtest(1, 4, 0.5).pvalue)
    same = next(row for row in rows if row["measure"] == "correct")
    assert (same["only_a"], same["only_b"], same["p"]) == (0, 0, 1.0)
    assert "| held_out | correct (strict) | 6 | 50.0 % | 83.3 % | 1 | 3 | 0.625 |" in paired.markdown(rows)
    with pytest.raises(ValueError, match="seeds '0-5' and '6-11'"):
        paired.compare(_report(), _report(seeds="6-11"))
    with pytest.raises(ValueError, match="set 'held_out' has other prompts"):
        paired.compare(_report(), _report(digest="abd"))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"seeds": "0-5", "sets": {"held_out": {"n": 6, "correct": 0.5}}}))
    with pytest.raises(ValueError, match="no per-image verdicts"):
        paired.read_report(old)
    with pytest.raises(ValueError, match="report.*none.json"):
        paired.read_report(tmp_path / "none.json")


def test_ldm_compare_pairs_two_ldm_eval_reports(tmp_path, capsys):
    a = _eval(tmp_path, "a", "--kinds", "seen", "held_out")
    b = _eval(tmp_path, "b", "--kinds", "held_out", "--guidance", "1")
    capsys.readouterr()
    assert main(["compare", str(a), str(b)]) == 0
    table = capsys.readouterr().out
    report_a, report_b = json.loads(a.read_text()), json.loads(b.read_text())
    for key, title in (("correct", "correct"), ("strict_correct", "correct (strict)")):
        row = f"| held_out | {title} | 3 | {100 * report_a['sets']['held_out'][key]:.1f} % | " \
              f"{100 * report_b['sets']['held_out'][key]:.1f} % |"
        assert row in table
    assert "| seen |" not in table  # only sets in both are compared
    c = _eval(tmp_path, "c", "--kinds", "held_out", "--seeds", "5")
    assert main(["compare", str(a), str(c)]) == 2
    assert "same seeds" in capsys.readouterr().err
