"""A random-weights base keeps the architecture and tokenizer of the folder it is made from."""

import shutil

import pytest
import torch
from fedprefix.common.base_model import load_base
from fedprefix.simulations.random_base import skeleton_files, write_random_base


def test_random_base_has_the_architecture_and_tokenizer_but_not_the_weights(tmp_path):
    real = load_base("tiny-llama")
    real.model.save_pretrained(tmp_path / "real")
    real.tokenizer.save_pretrained(tmp_path / "real")
    skeleton = tmp_path / "skeleton"  # the folder without its weights, as it travels
    skeleton.mkdir()
    for path in skeleton_files(tmp_path / "real"):
        shutil.copy2(path, skeleton / path.name)
    assert not list(skeleton.glob("*.safetensors"))

    # tiny-llama itself is seeded random weights (seed 0): another seed tells the two apart
    random = load_base(str(write_random_base(skeleton, tmp_path / "random", seed=1)))
    assert random.model.config.to_dict() | {"_name_or_path": ""} == real.model.config.to_dict() | {"_name_or_path": ""}
    text = "Good morrow, my lord."
    assert random.tokenizer(text).input_ids == real.tokenizer(text).input_ids
    assert random.fingerprint != real.fingerprint
    ids = torch.tensor([real.tokenizer(text).input_ids])
    assert not torch.allclose(random.model(ids).logits, real.model(ids).logits)
    again = load_base(str(write_random_base(skeleton, tmp_path / "again", seed=1)))  # seeded: the same weights
    assert torch.equal(again.model(ids).logits, random.model(ids).logits)


def test_random_base_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(SystemExit, match="no config.json"):
        write_random_base(tmp_path, tmp_path / "out")
