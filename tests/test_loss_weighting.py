"""Token-weighted loss under length-grouped batches: the mean over batches equals the token mean of the data."""
import datasets
import pytest
import torch

from tunepipe.specs import load_specs
from tunepipe.trainers.data import TokenWeightedLoss, token_weighted_loss


def specs_with(**training):
    return load_specs({"task": "token_classification", "model": "minilm", "data": {"train": "x.jsonl"},
                       "training": training})


def test_weighted_batch_means_average_to_the_token_mean():
    torch.manual_seed(0)
    short = torch.full((4, 3), -100)
    short[:, 0] = 1  # 4 examples with 1 label token each
    long = torch.randint(0, 3, (4, 12))  # 4 examples with 12 label tokens each
    token_losses = {"short": torch.rand(4), "long": torch.rand(48)}
    batch_means = {k: v.mean() for k, v in token_losses.items()}
    weigh = TokenWeightedLoss(tokens_per_example=(4 * 1 + 4 * 12) / 8)
    weighted = (weigh(batch_means["short"], {"labels": short}) + weigh(batch_means["long"], {"labels": long})) / 2
    token_mean = torch.cat(list(token_losses.values())).mean()
    plain = (batch_means["short"] + batch_means["long"]) / 2
    assert torch.allclose(weighted, token_mean)
    assert not torch.allclose(plain, token_mean)  # the bias the weighting removes


def test_on_by_default_for_per_token_labels_with_grouping_only():
    tagged = datasets.Dataset.from_dict({"labels": [[-100, 1, 2, -100], [-100, 0, -100]]})
    per_example = datasets.Dataset.from_dict({"labels": [1, 0]})
    weigh = token_weighted_loss(specs_with(), tagged)
    assert isinstance(weigh, TokenWeightedLoss) and weigh.tokens_per_example == 1.5
    assert token_weighted_loss(specs_with(), per_example) is None
    assert token_weighted_loss(specs_with(train_sampling_strategy="random"), tagged) is None
    assert token_weighted_loss(specs_with(token_weighted_loss=False), tagged) is None
    assert token_weighted_loss(specs_with(train_sampling_strategy="random", token_weighted_loss=True), tagged)


@pytest.mark.parametrize("backend", ["hf", "accelerate", "lightning"])
def test_training_loss_is_weighted_on_the_backends(tiny_specs, ner_data, backend, tmp_path):
    """One step on a batch with fewer label tokens than the data's mean logs a smaller loss than unweighted."""
    import json

    from tunepipe import FineTunePipeLine
    losses = {}
    for weighted in (True, False):
        specs = tiny_specs("token_classification", ner_data, backend=backend,
                           training={"max_steps": 1, "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no",
                                     "per_device_train_batch_size": 2, "token_weighted_loss": weighted,
                                     "bf16": False})
        specs["output_dir"] = str(tmp_path / f"run-{weighted}")
        pipe = FineTunePipeLine(specs)
        pipe.setup()
        pipe.train()
        records = [json.loads(x) for x in (pipe.output_dir / "train_log.jsonl").read_text().splitlines()]
        losses[weighted] = next(r["loss"] for r in records if "loss" in r)
        if weighted:
            weigh = token_weighted_loss(pipe.specs, pipe.datasets["train"])
    assert weigh is not None
    assert losses[True] != pytest.approx(losses[False], rel=1e-3)
