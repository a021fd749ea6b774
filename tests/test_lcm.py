"""Latent consistency distillation (`train lcm`): the consistency LoRA file, the pipeline switching Stage C to the
"lcm" sampler when one is loaded, and a few training steps moving the student toward its teacher."""

import pytest
import torch

from stablecascade import sampling
from stablecascade.errors import CheckpointError
from stablecascade.lora_formats import read_lora, save_lora
from stablecascade.models.lora import LayerDelta, LoRAWeights, lora_targets

FAST = dict(width=64, height=64, decoder_steps=2, progress=False, output_type="pt")


def consistency_lora(stage_c, path, steps=3, guidance=1.0):
    """A LoRA that changes nothing (zero factors) but says it is a consistency LoRA of Stage C."""
    layers = [LayerDelta("stage_c", module, param, torch.zeros(2, *getattr(stage_c.get_submodule(module), param).shape[1:]),
                         torch.zeros(getattr(stage_c.get_submodule(module), param).shape[0], 2))
              for module, param in lora_targets(stage_c, "attention")]
    save_lora(path, LoRAWeights(layers=layers), stage_c,
              metadata=sampling.consistency_metadata("prior", steps, guidance, teacher_guidance=4.0))
    return path


def prior_events(pipe, **kw):
    events = []
    pipe("a cat", seed=1, step_callback=events.append, **{**FAST, **kw})
    return [e for e in events if e.stage == "prior"]


def test_a_consistency_lora_switches_stage_c_to_lcm(pipe, tmp_path):
    path = consistency_lora(pipe.stage_c, tmp_path / "lcm.safetensors", steps=3)
    assert read_lora(path, pipe.stage_c).consistency == sampling.Consistency("prior", 3, 1.0)
    plain = prior_events(pipe, prior_steps=3, prior_guidance=1.0)
    pipe.load_lora(path)
    try:
        switched = prior_events(pipe)  # the LoRA's steps and guidance, and the lcm sampler for Stage C only
        explicit = prior_events(pipe, sampling="lcm", prior_steps=3, prior_guidance=1.0)
        assert [e.total for e in switched] == [3, 3, 3]
        assert torch.equal(switched[-1].x0, explicit[-1].x0)
        assert not torch.allclose(switched[-1].x0, plain[-1].x0)
        # the caller's choices win
        assert prior_events(pipe, prior_steps=5)[-1].total == 5
        assert prior_events(pipe, sampling="euler")[-1].total == 20
        pipe.set_lora_scale(next(iter(pipe.loras)), 0.0)
        assert prior_events(pipe)[-1].total == 20  # a LoRA switched off does not choose the sampler
    finally:
        pipe.unload_loras()
    assert prior_events(pipe)[-1].total == 20


def test_a_broken_consistency_record_is_named(pipe, tmp_path):
    path = consistency_lora(pipe.stage_c, tmp_path / "lcm.safetensors", steps=0)
    with pytest.raises(CheckpointError, match="stablecascade.consistency"):
        read_lora(path, pipe.stage_c)
