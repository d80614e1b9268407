"""The vision teachers (ViT, open_clip CLIP) and CIFAR-10: exact injection, true VJPs, zero-shot logits in class
order, checkpoints, serving over gRPC with uint8 images, local pretrained weights, the loader and the fitting."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, console_script, free_port, start_teacher_server
from services.teacher_server.checkpoint import load_teacher, save_teacher
from services.teacher_server.client import LocalTeacher, connect
from services.teacher_server.spec import CLASSIFICATION, IMAGE
from services.teacher_server.zoo import FAMILIES, ViTTeacher

CIFAR_ARCHIVE = SHARED_DATA / "cifar-10-jpg.tar.gz"
# Written out here rather than imported, so a reordering in the code cannot go unnoticed.
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def needs_open_clip():
    return pytest.importorskip("open_clip", reason="the CLIP teacher needs the vision extra (open_clip_torch)")


def random_images(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def vit_teacher():
    torch.manual_seed(0)
    return ViTTeacher.build("vit-tiny", "vit-cifar-tiny").freeze()


@pytest.fixture(scope="module")
def clip_teacher():
    needs_open_clip()
    from services.teacher_server.zoo import ClipTeacher

    torch.manual_seed(0)
    return ClipTeacher.build("clip-tiny", "clip-cifar-tiny").freeze()


@pytest.fixture(params=["vit", "clip"])
def teacher(request):
    return request.getfixturevalue(f"{request.param}_teacher")


def test_both_families_are_registered_and_describe_an_image_classifier(teacher):
    assert FAMILIES[teacher.family] is type(teacher)
    spec = teacher.spec
    (image,) = spec.inputs
    assert (image.name, image.kind, image.dtype, image.shape) == ("image", IMAGE, "uint8", (32, 32, 3))
    assert spec.task == CLASSIFICATION and spec.prediction_shape == (10,) and list(spec.class_names) == CLASSES
    n_layers = len(teacher.layers) if isinstance(teacher, ViTTeacher) else len(teacher.visual.transformer.resblocks)
    assert teacher.inject_layer == n_layers // 2  # the middle layer by default


# -- injection is exact -------------------------------------------------------------------------


def test_vit_injecting_its_own_class_token_reproduces_the_stock_forward(vit_teacher):
    images = random_images()
    question, hidden, prediction = vit_teacher.compute_predict({"image": images}, len(images))
    answer_hidden, answer_pred = vit_teacher.compute_answer(question, {"image": images})
    assert (answer_hidden - hidden).abs().max() <= 1e-6 and (answer_pred - prediction).abs().max() <= 1e-6
    # ... and that forward is transformers' own ViTModel: the class token after the final layernorm.
    with torch.no_grad():
        out = vit_teacher.vit(vit_teacher.pixels(images), output_hidden_states=True)
    assert torch.allclose(hidden, out.last_hidden_state[:, 0], atol=1e-6)
    assert torch.allclose(prediction, vit_teacher.head(out.last_hidden_state[:, 0]), atol=1e-6)
    # The question is the class token entering layer inject_layer (hidden_states[k] is layer k's input).
    assert torch.allclose(question, out.hidden_states[vit_teacher.inject_layer][:, 0], atol=1e-6)


def test_clip_injecting_its_own_class_token_reproduces_encode_image(clip_teacher):
    images = random_images()
    question, hidden, prediction = clip_teacher.compute_predict({"image": images}, len(images))
    answer_hidden, answer_pred = clip_teacher.compute_answer(question, {"image": images})
    assert (answer_hidden - hidden).abs().max() <= 1e-6 and (answer_pred - prediction).abs().max() <= 1e-6
    seen = {}
    block = clip_teacher.visual.transformer.resblocks[clip_teacher.inject_layer]
    handle = block.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0].clone()))
    try:
        with torch.no_grad():
            reference = clip_teacher.model.encode_image(clip_teacher.pixels(images))
    finally:
        handle.remove()
    assert torch.allclose(hidden, reference, atol=1e-6)
    assert torch.allclose(question, seen["x"][:, 0], atol=1e-6)


def test_clip_zero_shot_logits_are_scaled_cosines_with_the_class_prompts_in_order(clip_teacher):
    import open_clip
    import torch.nn.functional as F

    images = random_images(4, seed=3)
    _, image_emb, logits = clip_teacher.compute_predict({"image": images}, len(images))
    assert logits.shape == (4, 10)
    context = clip_teacher.model_cfg["text_cfg"]["context_length"]
    tokens = open_clip.tokenize([f"a photo of a {name}." for name in CLASSES], context_length=context)
    with torch.no_grad():
        text = F.normalize(clip_teacher.model.encode_text(tokens), dim=-1)
    expected = clip_teacher.model.logit_scale.exp() * F.normalize(image_emb, dim=-1) @ text.T
    for j in range(10):
        assert torch.allclose(logits[:, j], expected[:, j], atol=1e-5), CLASSES[j]


def test_the_question_changes_the_answer(teacher):
    images = random_images()
    question, hidden, _ = teacher.compute_predict({"image": images}, len(images))
    torch.manual_seed(0)  # (not a constant shift: pre-LN towers ignore adding c * ones to one token's state)
    other, _ = teacher.compute_answer(question + torch.randn_like(question), {"image": images})
    assert not torch.allclose(other, hidden, atol=1e-4)


def test_rejects_an_injection_layer_outside_the_tower():
    from transformers import ViTModel

    from services.teacher_server.zoo.vit import vit_config

    with pytest.raises(ValueError, match="inject_layer"):
        ViTTeacher("x", ViTModel(vit_config("vit-cifar-tiny"), add_pooling_layer=False), inject_layer=4)


def test_vjp_equals_autograd_on_the_same_function(teacher):
    torch.manual_seed(1)
    images = random_images(3, seed=5)
    n, spec = len(images), teacher.spec
    question = torch.randn(n, *spec.question_shape)
    d_hidden, d_pred = torch.randn(n, spec.hidden_size), torch.randn(n, 10)
    grad = teacher.compute_answer_vjp(question, {"image": images}, d_hidden, d_pred)
    q = question.clone().requires_grad_(True)
    hidden, prediction = teacher.answer(q, teacher.prepare({"image": images}, slice(None)))
    (reference,) = torch.autograd.grad((hidden, prediction), q, (d_hidden, d_pred))
    assert grad.abs().max() > 0
    assert torch.allclose(grad, reference, atol=1e-6)


# -- checkpoints, serving, pretrained weights ---------------------------------------------------------


def test_checkpoint_round_trip_gives_identical_outputs(teacher, tmp_path):
    from safetensors.torch import load_file

    folder = save_teacher(teacher, tmp_path / teacher.family)
    loaded = load_teacher(folder)
    assert type(loaded) is type(teacher) and loaded.spec.replace(weights_sha256="") == teacher.spec
    assert "class_text" not in load_file(folder / "model.safetensors")  # recomputed at load, not stored
    images = random_images()
    for a, b in zip(teacher.compute_predict({"image": images}, 5), loaded.compute_predict({"image": images}, 5)):
        assert torch.equal(a, b)
    question = torch.randn(5, *teacher.spec.question_shape)
    answers = (t.compute_answer(question, {"image": images}) for t in (teacher, loaded))
    for a, b in zip(*answers):
        assert torch.equal(a, b)


def test_served_teacher_answers_over_grpc_as_in_process(teacher, tmp_path):
    folder = save_teacher(teacher, tmp_path / teacher.family)
    local = LocalTeacher(load_teacher(folder))
    port = free_port()
    server = start_teacher_server(folder, port)
    remote = connect(f"grpc://127.0.0.1:{port}", timeout_s=60)
    try:
        assert remote.spec.inputs == local.spec.inputs and remote.spec.class_names == local.spec.class_names
        images = random_images(6, seed=7)  # uint8 on the wire: 6 x 3 KB
        torch.manual_seed(2)
        question = torch.randn(6, *local.spec.question_shape)
        d_hidden, d_pred = torch.randn(6, local.spec.hidden_size), torch.randn(6, 10)
        got, want = remote.predict({"image": images}), local.predict({"image": images})
        for field in ("question", "hidden", "prediction"):
            assert torch.allclose(getattr(got, field), getattr(want, field), atol=1e-6), field
        got, want = remote.answer(question, {"image": images}), local.answer(question, {"image": images})
        for field in ("hidden", "prediction"):
            assert torch.allclose(getattr(got, field), getattr(want, field), atol=1e-6), field
        got = remote.answer_vjp(question, {"image": images}, d_hidden, d_pred)
        assert torch.allclose(got, local.answer_vjp(question, {"image": images}, d_hidden, d_pred), atol=1e-6)
        with pytest.raises(ValueError, match="uint8"):  # float pixels are refused by the spec check
            remote.predict({"image": images.float()})
    finally:
        remote.close()
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("model_class", ["ViTModel", "ViTForImageClassification"])
def test_vit_loads_pretrained_weights_from_a_local_folder(model_class, tmp_path):
    import transformers

    from services.teacher_server.zoo.vit import vit_config

    torch.manual_seed(4)
    source = getattr(transformers, model_class)(vit_config("vit-cifar-tiny", num_labels=10))
    source.save_pretrained(tmp_path / "hf")
    teacher = ViTTeacher.pretrained("vit-pre", tmp_path / "hf", mean=(0.5,) * 3, std=(0.5,) * 3).freeze()
    source_vit = source if model_class == "ViTModel" else source.vit
    reference = {k: v for k, v in source_vit.state_dict().items() if not k.startswith("pooler")}
    assert reference.keys() == teacher.vit.state_dict().keys()
    assert all(torch.equal(v, teacher.vit.state_dict()[k]) for k, v in reference.items())
    images = random_images(2)
    with torch.no_grad():
        expected = source_vit(teacher.pixels(images)).last_hidden_state[:, 0]
    assert torch.allclose(teacher.compute_predict({"image": images}, 2)[1], expected, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ViTTeacher.pretrained("x", tmp_path)


def test_clip_loads_pretrained_weights_from_a_local_file(tmp_path):
    needs_open_clip()
    from safetensors.torch import save_file

    from services.teacher_server.zoo import ClipTeacher
    from services.teacher_server.zoo.clip import CLIP_PRESETS, build_clip

    torch.manual_seed(5)
    cfg = CLIP_PRESETS["clip-cifar-tiny"]
    source = build_clip(cfg).eval()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "clip.safetensors")
    teacher = ClipTeacher.pretrained("clip-pre", tmp_path / "clip.safetensors", model_cfg=cfg).freeze()
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in source.state_dict().items())
    images = random_images(3)
    with torch.no_grad():
        expected = source.encode_image(teacher.pixels(images))
    assert torch.allclose(teacher.compute_predict({"image": images}, 3)[1], expected, atol=1e-6)
    reference = ClipTeacher("ref", source, cfg)  # the class prompts' embeddings come from the loaded text tower
    assert torch.allclose(teacher.class_text, reference.class_text, atol=1e-6)


def test_clip_loads_a_named_open_clip_architecture_through_create_model(tmp_path):
    """A built-in config (ViT-S-32-alt at 64 px: 4 patches) from a weights file, via open_clip.create_model."""
    open_clip = needs_open_clip()
    from services.teacher_server.zoo import ClipTeacher

    torch.manual_seed(6)
    source = open_clip.create_model("ViT-S-32-alt", force_image_size=64).eval()
    torch.save(source.state_dict(), tmp_path / "vit-s-32-alt.pt")
    teacher = ClipTeacher.pretrained("clip-s", tmp_path / "vit-s-32-alt.pt", model_name="ViT-S-32-alt",
                                     force_image_size=64, inject_layer=6).freeze()
    assert teacher.image_size == 64 and teacher.spec.inputs[0].shape == (32, 32, 3)  # CIFAR pixels, upsampled
    images = random_images(2)
    with torch.no_grad():
        expected = source.encode_image(teacher.pixels(images))
    question, hidden, _ = teacher.compute_predict({"image": images}, 2)
    assert torch.allclose(hidden, expected, atol=1e-5)
    assert torch.allclose(teacher.compute_answer(question, {"image": images})[0], hidden, atol=1e-6)


def test_paper_scale_presets_are_named_but_not_built_here():
    """ViT-L/16 and CLIP ViT-B at 224 px (GPU-only presets): only their configs are checked, nothing is built."""
    from services.teacher_server.zoo.vit import vit_config

    large = vit_config("vit-l16-224")
    assert (large.hidden_size, large.num_hidden_layers, large.patch_size, large.image_size) == (1024, 24, 16, 224)
    needs_open_clip()
    from services.teacher_server.zoo.clip import CLIP_PRESETS, resolve_model_cfg

    base = resolve_model_cfg(CLIP_PRESETS["clip-b32"]["model_name"])
    vision = base["vision_cfg"]
    assert (vision["width"], vision["layers"], vision["image_size"]) == (768, 12, 224)


def test_clip_refuses_what_it_cannot_serve_offline():
    needs_open_clip()
    from services.teacher_server.zoo.clip import build_clip, resolve_model_cfg

    with pytest.raises(ValueError, match="Hugging Face"):
        build_clip(resolve_model_cfg("roberta-ViT-B-32"))
    with pytest.raises(ValueError, match="timm"):
        build_clip(resolve_model_cfg("ViT-B-16-SigLIP"))
    with pytest.raises(ValueError, match="no model config"):
        resolve_model_cfg("ViT-Nope")


# -- CIFAR-10 ---------------------------------------------------------------------------------------------


def class_color(label: int) -> tuple[int, int, int]:
    return (20 + 23 * label, 230 - 21 * label, (60 + 97 * label) % 256)


def jpeg(color, size: int = 32) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_tiny_cifar(path: Path, n_train: int = 3, n_test: int = 2, classes=CLASSES, size: int = 32) -> Path:
    """A tar.gz in the real archive's layout, classes listed in reverse so the order must come from the code."""
    with tarfile.open(path, "w:gz") as archive:
        for split, n in (("train", n_train), ("test", n_test)):
            for name in reversed(classes):
                label = CLASSES.index(name) if name in CLASSES else 0
                for i in range(n):
                    data = jpeg(class_color(label), size)
                    info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return path


def test_loader_decodes_a_tiny_archive_in_cifar_class_order(tmp_path):
    from trainer.data.cifar10 import load_cifar10

    data = load_cifar10(write_tiny_cifar(tmp_path / "tiny.tar.gz"), cache_dir=tmp_path / "cache")
    assert list(data.classes) == CLASSES and "tiny.tar.gz" in data.source
    assert data.train.images.shape == (30, 32, 32, 3) and data.train.images.dtype == np.uint8
    assert data.test.images.shape == (20, 32, 32, 3) and data.test.labels.dtype == np.int64
    assert np.bincount(data.train.labels).tolist() == [3] * 10 and np.bincount(data.test.labels).tolist() == [2] * 10
    for split in (data.train, data.test):
        means = split.images.reshape(len(split), -1, 3).mean(1)
        expected = np.array([class_color(int(label)) for label in split.labels])
        assert np.abs(means - expected).max() < 4  # each image carries its class's colour (JPEG is lossy)


def test_loader_reuses_its_cache_and_notices_a_changed_source(tmp_path, monkeypatch):
    import os

    import trainer.data.cifar10 as cifar10

    archive = write_tiny_cifar(tmp_path / "tiny.tar.gz")
    first = cifar10.load_cifar10(archive, cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").glob("cifar10-*.npz")
    decode = cifar10._decode

    def no_decoding(source):
        raise AssertionError("decoded again although the cache was valid")

    monkeypatch.setattr(cifar10, "_decode", no_decoding)
    again = cifar10.load_cifar10(archive, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.train.images, first.train.images)
    assert np.array_equal(again.test.labels, first.test.labels)
    monkeypatch.setattr(cifar10, "_decode", decode)
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a changed source is a new cache key
    cifar10.load_cifar10(archive, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("cifar10-*.npz"))) == 2
    cache_file.write_bytes(b"torn")  # an unreadable cache is decoded again, not trusted
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert np.array_equal(cifar10.load_cifar10(archive, cache_dir=tmp_path / "cache").train.images, first.train.images)


def test_loader_reads_an_extracted_folder_like_the_archive(tmp_path):
    from trainer.data.cifar10 import load_cifar10

    archive = write_tiny_cifar(tmp_path / "tiny.tar.gz")
    with tarfile.open(archive) as f:
        # extraction filters exist from Python 3.11.4 (3.12); older 3.11s (CI's system python) lack them
        f.extractall(tmp_path / "folder", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    from_folder = load_cifar10(tmp_path / "folder", cache_dir=None)
    from_archive = load_cifar10(archive, cache_dir=None)
    assert np.array_equal(from_folder.train.images, from_archive.train.images)
    assert np.array_equal(from_folder.test.labels, from_archive.test.labels)


@pytest.mark.parametrize(
    "classes, size, message",
    [
        (CLASSES[:-1], 32, r"missing \['truck'\]"),
        ([*CLASSES[:-1], "lorry"], 32, r"missing \['truck'\], unexpected \['lorry'\]"),
        (CLASSES, 28, "28x28"),
    ],
)
def test_loader_explains_a_bad_layout(classes, size, message, tmp_path):
    from trainer.data.cifar10 import LayoutError, load_cifar10

    with pytest.raises(LayoutError, match=message):
        load_cifar10(write_tiny_cifar(tmp_path / "bad.tar.gz", classes=classes, size=size), cache_dir=tmp_path)
    (tmp_path / "folder" / "train").mkdir(parents=True)
    with pytest.raises(LayoutError, match="no test/ folder"):
        load_cifar10(tmp_path / "folder", cache_dir=None)


def test_validation_split_is_seeded_stratified_and_disjoint():
    from trainer.data.cifar10 import CIFAR10, Images

    labels = np.repeat(np.arange(10), 40)
    images = np.zeros((len(labels), 32, 32, 3), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(len(labels)) % 256, np.arange(len(labels)) // 256
    data = CIFAR10(Images(images, labels), Images(images[:10], labels[:10]), tuple(CLASSES), "synthetic")

    def row_ids(part) -> set[int]:
        return set((part.images[:, 0, 0, 0] + 256 * part.images[:, 0, 0, 1].astype(int)).tolist())

    train, valid = data.split_validation(50, seed=0)
    assert len(valid) == 50 and len(train) == 350 and np.bincount(valid.labels).tolist() == [5] * 10
    assert not row_ids(train) & row_ids(valid) and len(row_ids(train) | row_ids(valid)) == 400
    assert np.array_equal(data.split_validation(50, seed=0)[1].images, valid.images)
    assert not np.array_equal(data.split_validation(50, seed=1)[1].images, valid.images)


def test_augmentation_is_a_reproducible_padded_crop_and_flip():
    from trainer.data.cifar10 import augment, augment_generator

    images = random_images(16)
    out = augment(images, augment_generator(0, 5))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, augment(images, augment_generator(0, 5)))
    assert not torch.equal(out, augment(images, augment_generator(0, 6)))
    assert torch.equal(augment(images, augment_generator(0, 5), padding=0, flip=False), images)
    flipped = augment(images, augment_generator(0, 5), padding=0)
    mirrored = [torch.equal(f, x.flip(1)) for f, x in zip(flipped, images)]
    assert all(m or torch.equal(f, x) for m, f, x in zip(mirrored, flipped, images)) and 0 < sum(mirrored) < 16
    padded = torch.nn.functional.pad(images, (0, 0, 4, 4, 4, 4))
    crops = augment(images, augment_generator(1, 0), flip=False)
    for crop, source in zip(crops, padded):  # every crop is a 32x32 window of the zero-padded image
        assert any(torch.equal(crop, source[dy : dy + 32, dx : dx + 32]) for dy in range(9) for dx in range(9))


@pytest.mark.skipif(not CIFAR_ARCHIVE.is_file(), reason=f"CIFAR-10 archive not found at {CIFAR_ARCHIVE}")
def test_real_cifar10_archive(tmp_path):
    """Decodes all 60,000 JPEGs once (about 15 s on 2 cores), then reads them from the cache."""
    import time

    from trainer.data.cifar10 import load_cifar10

    data = load_cifar10(CIFAR_ARCHIVE, cache_dir=tmp_path)
    assert data.train.images.shape == (50_000, 32, 32, 3) and data.test.images.shape == (10_000, 32, 32, 3)
    assert np.bincount(data.train.labels).tolist() == [5000] * 10
    assert np.bincount(data.test.labels).tolist() == [1000] * 10
    start = time.perf_counter()
    cached = load_cifar10(CIFAR_ARCHIVE, cache_dir=tmp_path)
    assert time.perf_counter() - start < 10
    assert np.array_equal(cached.test.images, data.test.images)


# -- fitting ----------------------------------------------------------------------------------------------


def synthetic_cifar(n_per_class: int = 12, seed: int = 0):
    """Noisy images in a colour per class: learnable in a few steps."""
    from trainer.data.cifar10 import CIFAR10, Images

    rng = np.random.default_rng(seed)

    def split(n):
        labels = np.repeat(np.arange(10), n)
        base = np.array([class_color(int(c)) for c in labels], np.float64)[:, None, None, :]
        images = np.clip(base + rng.normal(0, 30, (len(labels), 32, 32, 3)), 0, 255).astype(np.uint8)
        return Images(images, labels.astype(np.int64))

    return CIFAR10(split(n_per_class), split(4), tuple(CLASSES), "synthetic colours")


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_fit_teacher_trains_and_saves_a_servable_vision_teacher(kind, tmp_path):
    if kind == "clip":
        needs_open_clip()
    from trainer.evaluation import endpoint_accuracy
    from trainer.fit_teacher import fit_teacher
    from trainer.fit_vision import ClipFitConfig, ViTFitConfig

    data = synthetic_cifar()
    config_class = ViTFitConfig if kind == "vit" else ClipFitConfig
    config = config_class(preset=f"{kind}-cifar-tiny", max_steps=8, eval_every=4, batch_size=32, n_valid=20,
                          warmup_steps=2, lr=3e-3)
    result = fit_teacher(kind, data, seed=0, config=config)
    report = result.report
    assert report["steps"] == 8 and report["valid_rows"] == 20 and report["kind"] == kind
    assert report["recipe"]["preset"] == f"{kind}-cifar-tiny" and 0.0 <= report["test_accuracy"] <= 1.0
    assert not result.teacher.training and not any(p.requires_grad for p in result.teacher.parameters())
    folder = save_teacher(result.teacher, tmp_path / kind, {"fit": report})
    assert endpoint_accuracy(LocalTeacher(load_teacher(folder)), data.test) == pytest.approx(report["test_accuracy"])


def test_vision_fit_is_reproducible_by_seed():
    from trainer.fit_teacher import fit_teacher
    from trainer.fit_vision import ViTFitConfig

    data = synthetic_cifar(4)
    config = ViTFitConfig(preset="vit-cifar-tiny", max_steps=3, eval_every=3, batch_size=16, n_valid=10)
    a, b = (fit_teacher("vit", data, seed=3, config=config) for _ in range(2))
    for (k, x), (_, y) in zip(a.teacher.state_dict().items(), b.teacher.state_dict().items()):
        assert torch.equal(x, y), k


def test_cli_fits_a_vit_from_a_jpeg_archive(tmp_path):
    archive = write_tiny_cifar(tmp_path / "tiny.tar.gz", n_train=4)
    out = tmp_path / "vit"
    result = subprocess.run(
        [console_script("ddistill"), "--threads", "1", "fit-teacher", "--kind", "vit", "--data", str(archive),
         "--preset", "vit-cifar-tiny", "--max-steps", "2", "--valid-rows", "10", "--cache-dir", str(tmp_path / "c"),
         "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["checkpoint"] == str(out) and report["kind"] == "vit" and report["steps"] == 2
    teacher = load_teacher(out)
    assert teacher.spec.family == "vit" and teacher.spec.hidden_size == 64
