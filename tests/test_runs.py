"""The run folder's layout: fold order, checkpoint choice, loading errors."""
import pytest
import torch

from pipeline.core import runs
from pipeline.core.errors import PipelineError


def _fold(run, k, *checkpoints):
    folder = run / f"fold_{k}"
    folder.mkdir(parents=True)
    for which in checkpoints:
        runs.save_checkpoint(folder / f"{which}.pt", {"model": {"w": torch.full((1,), float(k))}})
    return folder


def test_fold_folders_sort_by_number_not_as_text(tmp_path):
    for k in (10, 2, 9, 0):
        _fold(tmp_path, k)
    (tmp_path / "fold_x").mkdir()  # not a fold folder
    (tmp_path / "fold_3.txt").write_text("")
    assert [k for k, _ in runs.fold_dirs(tmp_path)] == [0, 2, 9, 10]
    assert [p.name for _, p in runs.fold_dirs(tmp_path)] == ["fold_0", "fold_2", "fold_9", "fold_10"]


def test_checkpoints_are_selected_per_fold_in_fold_order(tmp_path):
    for k in (10, 1):
        _fold(tmp_path, k, "best", "last")
    _fold(tmp_path, 5, "last")  # no best.pt: left out of a best ensemble
    assert [p.parent.name for p in runs.select_checkpoints(tmp_path, "all", "best")] == ["fold_1", "fold_10"]
    assert [p.parent.name for p in runs.select_checkpoints(tmp_path, "all", "last")] == ["fold_1", "fold_5", "fold_10"]
    assert runs.select_checkpoints(tmp_path, "10", "last") == [tmp_path / "fold_10" / "last.pt"]
    with pytest.raises(PipelineError, match=r"no best.pt checkpoint in fold_5"):
        runs.select_checkpoints(tmp_path, "5", "best")


def test_a_checkpoint_round_trips_with_weights_only(tmp_path):
    folder = _fold(tmp_path, 3, "last")
    ckpt = runs.load_checkpoint(runs.checkpoint_path(folder, "last"))
    assert torch.equal(ckpt["model"]["w"], torch.tensor([3.0]))
    assert not list(folder.glob(".partial-*"))


@pytest.mark.parametrize("content, problem", [(b"not a checkpoint", "cannot load checkpoint"),
                                              (None, "no 'model' weights")])
def test_unusable_checkpoints_are_one_line_errors_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "best.pt"
    if content is None:
        torch.save({"weights": 1}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(PipelineError, match=problem) as info:
        runs.load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_weights_that_do_not_fit_the_model_name_the_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(PipelineError, match="does not fit the run's model") as info:
        runs.load_weights(model, tmp_path / "best.pt", {"weight": torch.zeros(3, 3)})
    assert "best.pt" in str(info.value)


def test_a_folder_without_config_is_not_a_run(tmp_path):
    with pytest.raises(PipelineError, match="not a run folder"):
        runs.read_config(tmp_path)
