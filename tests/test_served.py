"""``hf_cage.export.served``: an export evaluated as its format is served, with a token-weighted loss.

The stock path must work with hf_cage made unimportable in the child (a poisoned package first on its path), and
the loss must weigh every predicted token once, whatever the batch sizes and ignored labels.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import trained_checkpoint

from hf_cage.export import export_checkpoint, export_model
from hf_cage.export.served import HF_CAGE_LOADER, STOCK_LOADER, evaluate_served, served_eval, token_loss


@pytest.fixture(scope="module")
def int_export(tmp_path_factory):
    """A trained int W4A4 group-32 model exported with the defaults (compressed-tensors), and the trained model."""
    root = tmp_path_factory.mktemp("served")
    model = trained_checkpoint(
        root / "run", 0, quantizer="int", w_bits=4, a_bits=4, granularity="group", group_size=32
    )
    result = export_checkpoint(root / "run", root / "export", progress=False, log=None)
    assert result.format == "compressed-tensors"
    return root / "export", model


def _uneven_batch():
    """5 rows (a last batch of 1 at batch_size 2) with a different number of ignored labels in every row."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (5, 24), generator=generator)
    labels = ids.clone()
    for row, ignored in enumerate((0, 20, 3, 22, 9)):
        labels[row, 1 : 1 + ignored] = -100
    return ids, labels


def _reference(model, ids, labels):
    """Sum of token losses / non-ignored tokens, and the mean of the batch means (batches of 2 rows, the shapes the
    served side runs, so that the logits are the same bit for bit)."""
    with torch.no_grad():
        logits = torch.cat([model(input_ids=rows).logits.float() for rows in ids.split(2)])
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none"
    ).view(ids.shape[0], -1)
    kept = labels[:, 1:] != -100
    token_weighted = (per_token * kept).double().sum() / kept.sum()
    batch_means = [(per_token[s : s + 2] * kept[s : s + 2]).sum() / kept[s : s + 2].sum() for s in range(0, 5, 2)]
    return token_weighted.item(), torch.stack(batch_means).mean().item()


def test_stock_served_loss_weighs_tokens_not_batches(int_export):
    export_dir, model = int_export
    ids, labels = _uneven_batch()
    expected, batch_mean = _reference(model, ids, labels)
    assert abs(expected - batch_mean) > 1e-3  # the batch shape makes the two averages differ (by 7e-3)

    result = evaluate_served(export_dir, ids, labels, batch_size=2)
    assert result.loader == STOCK_LOADER and result.dtype == "float32"
    assert result.tokens == int((labels[:, 1:] != -100).sum())
    assert result.loss == pytest.approx(expected, abs=1e-5)
    stock = served_eval(export_dir, ids, labels=labels, loss=True, logits=True, batch_size=2)
    assert stock.loss == result.loss
    total, count, logits = token_loss(model, ids, labels, batch_size=2, logits=True)  # the same function, here
    assert torch.equal(stock.logits, logits) and (total / count, count) == (result.loss, result.tokens)


def test_hf_cage_format_is_served_by_load_quantized_with_the_same_loss(tmp_path):
    from test_export import QUEST_W4A4, qat_model

    model = qat_model(**QUEST_W4A4).eval()
    export_model(model, tmp_path / "quest", progress=False, log=None)
    ids, labels = _uneven_batch()
    expected, _ = _reference(model, ids, labels)
    result = evaluate_served(tmp_path / "quest", ids, labels, batch_size=2)
    assert result.loader == HF_CAGE_LOADER
    assert result.loss == pytest.approx(expected, abs=1e-5)


def test_stock_evaluation_never_imports_hf_cage(int_export, tmp_path, monkeypatch):
    """A poisoned ``hf_cage`` first on the child's path: importing it records a marker and raises."""
    export_dir, model = int_export
    poison, marker = tmp_path / "poison", tmp_path / "hf_cage_was_imported"
    (poison / "hf_cage").mkdir(parents=True)
    (poison / "hf_cage" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise ImportError('poisoned hf_cage imported by the stock loader')\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(poison), os.environ.get("PYTHONPATH", "")]))
    ids, _ = _uneven_batch()
    result = evaluate_served(export_dir, ids, batch_size=2)
    assert not marker.exists()
    expected, _ = _reference(model, ids, ids)
    assert result.loader == STOCK_LOADER and result.loss == pytest.approx(expected, abs=1e-5)


def test_evaluate_served_refuses_what_is_not_an_export(tmp_path):
    with pytest.raises(ValueError, match="no readable config.json"):
        evaluate_served(tmp_path / "nothing", torch.zeros(1, 4, dtype=torch.long))
