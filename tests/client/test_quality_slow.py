"""Quality on the built-in base (slow): a prefix fit on ~50 persona rows learns the style
and keeps the prompt's content. Figures are reported in the README."""

from __future__ import annotations

import pytest
from fedprefix.client import Personalizer
from fedprefix.simulations.personas import slot_realization, style_ok, training_rows, user_dataset

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("user", [1, 2])
def test_personal_prefix_learns_style_and_keeps_content(user):
    data = user_dataset(user, 55)
    p = Personalizer(
        base_model="smollm2-135m-instruct", user_id=f"u{user}", num_virtual_tokens=16, max_steps=60, progress=False
    )
    test_rows = training_rows(data["test"])
    base_loss = p.evaluate(test_rows, parts="none").loss
    p.fit(training_rows(data["train"] + data["val"]))
    assert p.evaluate(test_rows).loss < 0.5 * base_loss
    outputs = p.generate([r["prompt"] for r in data["test"][:6]], max_new_tokens=60)
    style = sum(style_ok(data["style"], o) for o in outputs) / len(outputs)
    slots = sum(slot_realization(r["record"], o) for r, o in zip(data["test"], outputs, strict=False)) / len(outputs)
    assert style >= 0.8, outputs
    assert slots >= 0.7, outputs
