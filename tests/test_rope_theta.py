"""A RoPE scaling written the way Llama users write it (no theta) keeps the model's theta, however it is given."""

import warnings

import pytest
import torch
from conftest import tiny_model

from modeling_parcae import ParcaeForCausalLM, load_preset

SCALING = {"rope_type": "linear", "factor": 2.0}


def test_the_140m_preset_keeps_its_theta_under_a_scaling_given_to_the_constructor():
    assert load_preset("parcae-140m").rope_parameters["rope_theta"] == 50000.0
    assert load_preset("parcae-140m", rope_parameters=dict(SCALING)).rope_parameters == {**SCALING, "rope_theta": 50000.0}


def test_a_scaling_set_as_an_attribute_keeps_the_theta():
    config = load_preset("parcae-140m")
    config.rope_parameters = dict(SCALING)
    assert config.rope_parameters["rope_theta"] == 50000.0
    config = load_preset("parcae-140m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecates the rope_scaling name
        config.rope_scaling = dict(SCALING)
    assert config.rope_parameters == {**SCALING, "rope_theta": 50000.0}


def test_a_from_pretrained_keyword_keeps_the_checkpoints_own_theta(tmp_path):
    model = tiny_model()
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 777.0}
    model.save_pretrained(tmp_path)
    loaded = ParcaeForCausalLM.from_pretrained(tmp_path, rope_parameters=dict(SCALING))
    assert loaded.config.rope_parameters == {**SCALING, "rope_theta": 777.0}
    # linear scaling divides positions by the factor: position 2p of the scaled model is position p of the original
    original = ParcaeForCausalLM.from_pretrained(tmp_path)
    scaled_inv_freq = loaded.model.rotary_emb.inv_freq
    torch.testing.assert_close(scaled_inv_freq * 2.0, original.model.rotary_emb.inv_freq)


@pytest.mark.parametrize("theta", [None, 1234.0])
def test_an_explicit_theta_is_honoured(theta):
    rope = dict(SCALING) if theta is None else {**SCALING, "rope_theta": theta}
    assert load_preset("parcae-140m", rope_parameters=rope).rope_parameters["rope_theta"] == (theta or 50000.0)
