"""The dataset convention of the new formats: SAMPLE_ARGS and NON_SAMPLE_ARGS name every
constructor argument, each SAMPLE_ARG is kept on the instance, and source_files lists real files."""

from __future__ import annotations

import inspect

import pytest

from samtrain.data.crops import ObjectCropDataset
from samtrain.data.cvat import CvatImagesDataset
from samtrain.data.labelme import LabelmeDataset
from samtrain.data.voc import VocInstanceDataset
from samtrain.data.volume import VolumeSliceDataset
from samtrain.data.yolo import YoloSegmentationDataset
from tests.data import format_fixtures

CLASSES = {
    "yolo": YoloSegmentationDataset,
    "labelme": LabelmeDataset,
    "cvat": CvatImagesDataset,
    "voc": VocInstanceDataset,
    "volume": VolumeSliceDataset,
}


@pytest.mark.parametrize("cls", [*CLASSES.values(), ObjectCropDataset], ids=lambda c: c.__name__)
def test_sample_and_non_sample_args_name_every_constructor_argument(cls):
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert set(cls.SAMPLE_ARGS) | set(cls.NON_SAMPLE_ARGS) == params
    assert not set(cls.SAMPLE_ARGS) & set(cls.NON_SAMPLE_ARGS)


@pytest.mark.parametrize("option", list(CLASSES))
def test_sample_args_are_attributes_and_source_files_exist(option, tmp_path):
    overrides = dict(o.split("=", 1) for o in format_fixtures.format_overrides(option, tmp_path))
    kwargs = {k.split(".")[-1]: v for k, v in overrides.items() if k.startswith("data.train_dataset.")}
    kwargs = {k: (None if v == "null" else float(v) if k == "val_fraction" else v) for k, v in kwargs.items()}
    dataset = CLASSES[option](**kwargs)
    for name in dataset.SAMPLE_ARGS:
        assert hasattr(dataset, name), name
    files = dataset.source_files()
    assert files and all(path.is_file() for path in files)
