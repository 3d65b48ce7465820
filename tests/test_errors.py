"""ErrorHandler maps library failures to typed errors; model loading errors are typed too."""
import pytest

from tunepipe.errors import ErrorHandler, ModelNotFoundError, TunepipeError


@pytest.mark.parametrize("exc, code", [
    (MemoryError(), "MEMORY_ERROR"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "MEMORY_ERROR"),
    (ModuleNotFoundError("No module named 'lightning'", name="lightning"), "IMPORT_ERROR"),
    (PermissionError(13, "Permission denied", "/root/x"), "IO_ERROR"),
    (RuntimeError("CUDA driver version is insufficient"), "CUDA_ERROR"),
    (ValueError("something else"), "TRAINING_ERROR"),
])
def test_translate(exc, code):
    err = ErrorHandler.translate(exc, "training")
    assert isinstance(err, TunepipeError) and err.code == code and err.suggestions


def test_guard_passes_tunepipe_errors_through():
    original = ModelNotFoundError("x")
    with pytest.raises(ModelNotFoundError) as e:
        with ErrorHandler.guard("loading"):
            raise original
    assert e.value is original


def test_missing_model_path_and_unreachable_hub_id(tmp_path):
    from tunepipe.modeling.models import ModelModules, resolve_model_path
    from tunepipe.specs import load_specs
    from tunepipe.tasks import get_task
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model_path(str(tmp_path / "no-such-model"))
    assert e.value.field == "model.name_or_path"
    specs = load_specs({"task": "ner", "model": "nobody/no-such-model-xyz", "data": {"train": "x"}})
    task = get_task("ner")(specs)
    task.labels = ["O", "B-X"]
    with pytest.raises(ModelNotFoundError) as e:
        ModelModules(specs).load(task)
    assert "nobody/no-such-model-xyz" in e.value.message and e.value.suggestions


def test_render_contains_location_and_suggestions():
    err = ModelNotFoundError("gone", field="model.name_or_path", suggestions=["use 'minilm'"])
    assert err.render() == "[MODEL_NOT_FOUND] gone (field 'model.name_or_path')\n  -> use 'minilm'"
