from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.image_folders import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataModule
from lightning_uda import DANN, ResNet
from train import DomainAdaptationCLI

PROJECT_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 16
IMAGES_PER_CLASS = 4


def write_image(path: Path, value: int, mode: str = "RGB", size: tuple[int, int] = (24, 20)) -> None:
    """Write an image of `value` in every pixel and channel; `size` is (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, value, value)
    Image.new(mode, size, color).save(path)


def write_domain(folder: Path, classes: list[str], mode: str = "RGB") -> None:
    """Write IMAGES_PER_CLASS images per class, in the order given, each a grey level 10 * (image number + 1)."""
    for name in classes:
        for index in range(IMAGES_PER_CLASS):
            write_image(folder / name / f"{index}.png", 10 * (index + 1), mode)


@pytest.fixture
def office_root(tmp_path):
    root = tmp_path / "office"
    # Created in different orders, so class indices must not follow creation order.
    write_domain(root / "amazon", ["zebra", "apple", "mango"])
    write_domain(root / "webcam", ["mango", "zebra", "apple"])
    return root


def make_datamodule(root: Path, source: str = "amazon", target: str = "webcam", **kwargs) -> ImageFolderDataModule:
    options = dict(image_size=IMAGE_SIZE, val_fraction=0.25, batch_size=4)
    options.update(kwargs)
    return ImageFolderDataModule(str(root), source, target, **options)


def sample_paths(view) -> set[str]:
    return {view.folder.samples[i][0] for i in view.indices}


def test_class_indices_sorted_and_shared(office_root):
    datamodule = make_datamodule(office_root)

    assert datamodule.num_classes == 3
    assert datamodule.class_names == ["apple", "mango", "zebra"]

    datamodule.setup()
    for name in ("source_train", "source_val", "target_train", "target_test"):
        view = getattr(datamodule, name)
        for index in view.indices:
            path, label = view.folder.samples[index]
            assert datamodule.class_names[label] == Path(path).parent.name, f"{name}: {path} has label {label}"
    assert datamodule.source_train.folder.class_to_idx == datamodule.target_train.folder.class_to_idx


def test_splits_follow_standard_protocol(office_root):
    datamodule = make_datamodule(office_root)
    datamodule.setup()
    all_images = 3 * IMAGES_PER_CLASS

    source_train = sample_paths(datamodule.source_train)
    source_val = sample_paths(datamodule.source_val)
    assert not source_train & source_val
    assert len(source_train | source_val) == all_images
    assert len(source_val) == 3
    assert sample_paths(datamodule.source_test) == source_val

    target_train = sample_paths(datamodule.target_train)
    assert len(target_train) == all_images
    assert sample_paths(datamodule.target_test) == target_train
    assert len(sample_paths(datamodule.target_val)) == 3
    assert sample_paths(datamodule.target_val) <= target_train
    assert sorted(datamodule.target_val.labels) == [0, 1, 2]


def test_grey_images_become_normalized_rgb(tmp_path):
    root = tmp_path / "office"
    write_domain(root / "amazon", ["apple", "mango", "zebra"], mode="L")
    write_domain(root / "webcam", ["apple", "mango", "zebra"], mode="L")
    datamodule = make_datamodule(root)
    datamodule.setup()

    for name in ("source_train", "source_test", "target_train", "target_test"):
        view = getattr(datamodule, name)
        inputs, _ = view[0]
        value = int(Path(view.folder.samples[view.indices[0]][0]).stem) * 10 + 10
        assert inputs.shape == (3, IMAGE_SIZE, IMAGE_SIZE), name
        assert inputs.dtype == torch.float32, name
        for channel in range(3):
            expected = (value / 255 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
            assert torch.allclose(inputs[channel], torch.tensor(expected), atol=1e-5), f"{name} channel {channel}"


def test_train_batch_has_unlabeled_target(office_root):
    datamodule = make_datamodule(office_root)
    datamodule.setup()

    batch = next(iter(datamodule.train_dataloader()))[0]
    source_inputs, source_labels = batch["source"]
    assert source_inputs.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert source_labels.shape == (4,)
    assert isinstance(batch["target"], torch.Tensor)
    assert batch["target"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_mismatched_classes_named(tmp_path):
    root = tmp_path / "office"
    write_domain(root / "amazon", ["apple", "kettle", "zebra"])
    write_domain(root / "webcam", ["apple", "bike", "zebra"])
    datamodule = make_datamodule(root)

    with pytest.raises(ValueError, match="only in source: 'kettle'; only in target: 'bike'"):
        datamodule.num_classes


def test_empty_domain_rejected(office_root):
    (office_root / "dslr" / "apple").mkdir(parents=True)
    datamodule = make_datamodule(office_root, target="dslr")

    with pytest.raises(ValueError, match="dslr contains no images"):
        datamodule.setup()


def test_class_folder_without_images_named(office_root):
    (office_root / "webcam" / "pear").mkdir()
    datamodule = make_datamodule(office_root)

    with pytest.raises(ValueError, match="Class folders without images in .*webcam: 'pear'"):
        datamodule.setup()


def test_unknown_domain_lists_domains(office_root):
    datamodule = make_datamodule(office_root, target="dslr")

    with pytest.raises(FileNotFoundError, match="dslr not found. Root .* contains 'amazon', 'webcam'"):
        datamodule.num_classes


def test_root_one_level_too_low_detected(office_root):
    datamodule = make_datamodule(office_root / "amazon")

    with pytest.raises(FileNotFoundError, match="looks like a single domain folder") as error:
        datamodule.num_classes
    assert f"set root to {office_root}" in str(error.value)


def test_root_one_level_too_high_detected(office_root):
    datamodule = make_datamodule(office_root.parent)

    with pytest.raises(FileNotFoundError, match="root is one level too high") as error:
        datamodule.num_classes
    assert f"Set root to {office_root}." in str(error.value)


def test_images_without_class_folders_rejected(office_root):
    for index in range(3):
        write_image(office_root / "dslr" / f"{index}.png", 50)
    datamodule = make_datamodule(office_root, target="dslr")

    with pytest.raises(ValueError, match="contains images but no class folders"):
        datamodule.num_classes


def test_office31_images_subfolder_layout(tmp_path):
    root = tmp_path / "office31"
    write_domain(root / "amazon" / "images", ["apple", "mango", "zebra"])
    write_domain(root / "webcam" / "images", ["apple", "mango", "zebra"])

    with pytest.raises(ValueError, match="one folder level deeper .* Pass the domain as 'amazon/images'"):
        make_datamodule(root).num_classes

    datamodule = make_datamodule(root, source="amazon/images", target="webcam/images")
    datamodule.setup()
    assert datamodule.num_classes == 3
    assert len(datamodule.target_test) == 3 * IMAGES_PER_CLASS


def truncate(path: Path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def test_truncated_image_raises_with_path(office_root):
    broken = office_root / "webcam" / "mango" / "2.png"
    write_image(broken, 200, size=(64, 64))
    truncate(broken)
    datamodule = make_datamodule(office_root)
    datamodule.setup()

    with pytest.raises(OSError, match=f"Failed to read image {broken}"):
        for index in range(len(datamodule.target_test)):
            datamodule.target_test[index]


def test_skip_unreadable_warns_with_paths(office_root):
    broken = office_root / "webcam" / "mango" / "2.png"
    write_image(broken, 200, size=(64, 64))
    truncate(broken)
    not_an_image = office_root / "webcam" / "apple" / "0.png"
    not_an_image.write_bytes(b"not an image")
    datamodule = make_datamodule(office_root, skip_unreadable=True)

    with pytest.warns(UserWarning, match="Skipped 2 unreadable images") as warnings:
        datamodule.setup()

    message = next(str(warning.message) for warning in warnings if "unreadable" in str(warning.message))
    assert str(broken) in message
    assert str(not_an_image) in message
    assert len(datamodule.target_test) == 3 * IMAGES_PER_CLASS - 2
    assert str(broken) not in sample_paths(datamodule.target_train)
    for index in range(len(datamodule.target_test)):
        datamodule.target_test[index]


def test_office_config_fits_resnet50(office_root, tmp_path):
    # A YAML null, because "null" on the command line reaches `str | None` as the string "None".
    random_weights = tmp_path / "random_weights.yaml"
    random_weights.write_text("model:\n  init_args:\n    feature_extractor:\n      init_args:\n        weights_path: null\n")
    cli = DomainAdaptationCLI(
        args=[
            "--config",
            str(PROJECT_ROOT / "configs" / "dann_office.yaml"),
            "--config",
            str(random_weights),
            "--data.root",
            str(office_root),
            "--data.image_size",
            "32",
            "--data.val_fraction",
            "0.25",
            "--data.batch_size",
            "2",
            "--data.num_workers",
            "0",
            "--trainer.fast_dev_run",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path / "logs"),
        ],
        run=False,
    )
    assert isinstance(cli.model, DANN)
    assert isinstance(cli.model.feature_extractor, ResNet)
    assert cli.model.feature_extractor.out_features == 2048
    assert cli.model.num_classes == 3
    classifier_before = cli.model.classifier.weight.detach().clone()

    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    assert not torch.equal(classifier_before, cli.model.classifier.weight)
