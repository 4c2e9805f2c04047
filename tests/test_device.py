"""The GPU path: device selection (train.device, predict.device, --device: one function), the
train.deterministic switch, and the DataLoader settings of a training."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import yaml

from noduleflow import model as nf_model
from noduleflow.io import InputError
from noduleflow.predict import PREDICT_DEFAULTS, inference_device, predict_fold
from noduleflow.train import (_HASH_EXCLUDED, _config_hash, _torch_settings, loader_settings, resolve_config,
                              select_device, train_fold)

from test_train import TINY, write_disc_patches, write_folds
from workflow_helpers import REPO_ROOT

SCHEMA = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"


def _torch_flags() -> tuple[bool, bool, bool]:
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark)


@pytest.fixture
def restore_torch_flags():
    """Whatever a test sets, the session's flags come back afterwards."""
    saved = _torch_flags()
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark = saved[2]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_cuda_device(monkeypatch):
    """As if this machine had one CUDA device (selection only: nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


# --------------------------------------------------------------------------- train.deterministic


def test_deterministic_defaults_to_true_and_must_be_a_boolean():
    assert resolve_config({})["deterministic"] is True
    assert resolve_config({"deterministic": False})["deterministic"] is False
    with pytest.raises(InputError, match="train.deterministic"):
        resolve_config({"deterministic": "no"})


def test_deterministic_is_part_of_the_checkpoint_hash_and_num_workers_is_not():
    """deterministic: false changes the numbers on a GPU, so a checkpoint of the other setting is
    not resumed; the number of loader workers changes nothing."""
    assert "deterministic" not in _HASH_EXCLUDED
    base = _config_hash(resolve_config({}), 0, "data")
    assert _config_hash(resolve_config({"deterministic": True}), 0, "data") == base
    assert _config_hash(resolve_config({"deterministic": False}), 0, "data") != base
    assert _config_hash(resolve_config({"num_workers": 3}), 0, "data") == base


@pytest.mark.parametrize("deterministic", [True, False])
def test_torch_settings_set_the_switch_and_restore_the_flags_even_on_error(deterministic, restore_torch_flags):
    torch.use_deterministic_algorithms(not deterministic)
    torch.backends.cudnn.benchmark = deterministic
    before = _torch_flags()
    with pytest.raises(RuntimeError, match="inside"):
        with _torch_settings(1, torch.device("cpu"), deterministic):
            assert torch.are_deterministic_algorithms_enabled() is deterministic
            assert torch.backends.cudnn.benchmark is (not deterministic)
            if deterministic:
                assert torch.is_deterministic_algorithms_warn_only_enabled()
            raise RuntimeError("inside")
    assert _torch_flags() == before


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_data")
    return write_disc_patches(root / "patches.h5", n_scans=4, per_scan=12), write_folds(root / "folds.csv", 4, 2)


@pytest.mark.parametrize("deterministic", [True, False])
def test_a_training_runs_under_its_deterministic_setting_and_restores_the_flags(
        deterministic, data, tmp_path, monkeypatch, restore_torch_flags):
    """The flags seen by every training step (recorded from inside the loss) are those of
    train.deterministic; after the training the caller's flags are back."""
    import noduleflow.train as nf_train

    seen = []
    real_make_loss = nf_train.make_loss

    def recording_make_loss(*args, **kwargs):
        loss = real_make_loss(*args, **kwargs)

        def recorded(*a, **k):
            seen.append(_torch_flags())
            return loss(*a, **k)
        return recorded

    monkeypatch.setattr(nf_train, "make_loss", recording_make_loss)
    torch.use_deterministic_algorithms(not deterministic)
    torch.backends.cudnn.benchmark = deterministic
    before = _torch_flags()
    cfg = {**TINY, "epochs": 1, "batch_size": 8, "deterministic": deterministic}
    meta = train_fold(data[0], data[1], 0, out_model=tmp_path / "model.pt", out_history=tmp_path / "history.csv",
                      checkpoint_dir=tmp_path / "checkpoints", threads=1, **cfg)
    assert seen, "the loss was never called"
    expected = (True, True, False) if deterministic else (False, False, True)
    assert set(seen) == {expected}
    assert _torch_flags() == before
    assert meta["train"]["deterministic"] is deterministic   # stored in model.pt with the config


# --------------------------------------------------------------------------- device selection


def test_auto_is_cuda_when_there_is_one_else_cpu(no_cuda):
    assert inference_device("auto") == "cpu"
    assert select_device("auto").type in ("cpu", "mps")   # training also takes mps


def test_auto_and_named_cuda_devices_when_cuda_is_there(one_cuda_device):
    assert inference_device("auto") == "cuda"
    assert select_device("auto") == torch.device("cuda")
    assert inference_device("cuda:0") == "cuda:0" and inference_device("cuda") == "cuda"
    with pytest.raises(InputError, match=r"config predict.device: cuda:1 requested but only 1 CUDA device"):
        inference_device("cuda:1")


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "tpu", "", "cpu:0", "CUDA", " cuda"])
def test_an_unknown_predict_device_is_named(bad):
    with pytest.raises(InputError, match=r"config predict.device: .* is not a device; use auto, cpu, cuda, cuda:N"):
        inference_device(bad)


def test_cuda_without_cuda_is_named_for_each_setting(no_cuda):
    with pytest.raises(InputError, match="config predict.device: cuda requested but no CUDA device is available"):
        inference_device("cuda")
    with pytest.raises(InputError, match="config predict.device: cuda:0 requested but no CUDA device"):
        inference_device("cuda:0")
    with pytest.raises(InputError, match="config train.device: cuda requested but no CUDA device is available"):
        select_device("cuda")
    from noduleflow.apply import resolve_device

    with pytest.raises(InputError, match="--device: cuda requested but no CUDA device is available"):
        resolve_device("cuda")


def test_predict_fold_checks_its_device_before_reading_anything(tmp_path):
    with pytest.raises(InputError, match="config predict.device: 'gpu' is not a device"):
        predict_fold(tmp_path / "missing.pt", tmp_path / "missing.csv", 0, [], tmp_path / "candidates.csv",
                     tmp_path / "probabilities", lung_roi=True, device="gpu")
    assert not any(tmp_path.iterdir())


def test_predict_rule_apply_rule_and_cli_share_one_device_function(monkeypatch):
    """predict_fold (the predict rule), apply's resolve_device (`noduleflow predict --device` and the
    apply rule) and train.device all go through noduleflow.model.select_device."""
    import noduleflow.train as nf_train
    from noduleflow.apply import resolve_device

    calls = []

    def spy(device="auto", setting="device", auto_mps=True):
        calls.append((device, setting, auto_mps))
        return torch.device("cpu")

    monkeypatch.setattr(nf_model, "select_device", spy)
    monkeypatch.setattr(nf_train, "_select_device", spy)
    assert inference_device("auto") == "cpu" and resolve_device("auto") == "cpu"
    assert resolve_device("cpu", "config predict.device") == "cpu"
    assert select_device("auto") == torch.device("cpu")
    assert calls == [("auto", "config predict.device", False), ("auto", "--device", False),
                     ("cpu", "config predict.device", False), ("auto", "config train.device", True)]


def test_every_predict_key_reaches_the_predict_and_apply_code():
    """workflow/scripts/predict.py passes the predict block as keywords to predict_fold; the apply
    rule's script takes device out and builds PredictSettings from the rest."""
    from noduleflow.apply import PredictSettings

    assert PREDICT_DEFAULTS["device"] == "auto"
    assert set(PREDICT_DEFAULTS) <= set(inspect.signature(predict_fold).parameters)
    assert {f.name for f in dataclasses.fields(PredictSettings)} == set(PREDICT_DEFAULTS) - {"device"}
    script = (REPO_ROOT / "workflow" / "scripts" / "apply.py").read_text(encoding="utf-8")
    assert 'pop("device"' in script and "config predict.device" in script


@pytest.mark.parametrize("value, valid", [("auto", True), ("cpu", True), ("cuda", True), ("cuda:3", True),
                                          ("mps", True), ("gpu", False), ("cuda:x", False), ("CPU", False)])
def test_the_schema_checks_predict_device(value, valid):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    config = yaml.safe_load((REPO_ROOT / "config.yaml").read_text(encoding="utf-8"))
    config["predict"]["device"] = value
    if valid:
        validate(config, str(SCHEMA))
    else:
        with pytest.raises(WorkflowError, match="device"):
            validate(config, str(SCHEMA))


# --------------------------------------------------------------------------- DataLoader settings


@pytest.mark.parametrize("device, workers, pinned", [("cpu", 0, False), ("cpu", 2, False), ("cuda", 0, False),
                                                     ("cuda", 2, True), ("cuda:1", 3, True), ("mps", 2, False)])
def test_loader_settings_pin_memory_exactly_for_cuda_with_workers(device, workers, pinned):
    settings = loader_settings(torch.device(device), workers)
    assert settings == {"num_workers": workers, "pin_memory": pinned, "persistent_workers": False}
    assert loader_settings(device, workers) == settings          # a device name works too


def test_loader_settings_refuse_negative_workers():
    with pytest.raises(InputError, match="train.num_workers"):
        loader_settings(torch.device("cpu"), -1)
    with pytest.raises(InputError, match="train.num_workers"):
        resolve_config({"num_workers": -1})


def test_loader_settings_feed_a_dataloader_that_gives_the_same_batches():
    items = [{"image": torch.full((2, 3), float(i))} for i in range(5)]
    loader = torch.utils.data.DataLoader(items, batch_size=None, shuffle=False,
                                         **loader_settings(torch.device("cpu"), 1))
    assert [int(batch["image"][0, 0]) for batch in loader] == list(range(5))
