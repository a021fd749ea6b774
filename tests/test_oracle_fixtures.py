"""Quick checks that the offline diffusers oracle in tests/oracle.py builds and behaves as documented."""

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import torch  # noqa: E402
from diffusers.loaders.single_file_utils import convert_stable_cascade_unet_single_file_to_diffusers  # noqa: E402

import oracle  # noqa: E402


@pytest.fixture(scope="module")
def tc():
    return oracle.build_tiny_cascade()


def _gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def test_tokenizer_matches_bigg_conventions():
    tok = oracle.build_tokenizer()
    assert tok is oracle.build_tokenizer()  # cached
    assert len(tok) == 49408 and tok.model_max_length == 77 and tok.pad_token_id == 0
    ids = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[7:] == [0] * 70 and len(ids) == 77
    assert tok("wow!").input_ids[-2] == 0  # bigG quirk: a literal "!" is the pad token (id 0)


@pytest.mark.parametrize(("name", "configs"), [
    *[(n, oracle.PRIOR_CONFIGS) for n in oracle.PRIOR_CONFIGS],
    *[(n, oracle.DECODER_CONFIGS) for n in oracle.DECODER_CONFIGS],
])
def test_official_state_dict_round_trip(name, configs):
    unet = oracle.diffusers_unet(configs[name], seed=3)
    official = oracle.official_state_dict(unet)
    assert not any(".to_q." in k or ".to_out." in k for k in official)
    stage_b = configs is oracle.DECODER_CONFIGS
    assert ("clip_mapper.weight" in official) == stage_b
    assert ("clip_txt_pooled_mapper.weight" in official) != stage_b
    in_proj = [k for k in official if k.endswith("attention.attn.in_proj_weight")]
    assert in_proj and all(official[k].shape[0] == 3 * official[k].shape[1] for k in in_proj)

    back = convert_stable_cascade_unet_single_file_to_diffusers(official)
    ref = unet.state_dict()
    assert set(back) == set(ref)
    assert all(torch.equal(back[k], v) for k, v in ref.items())


def test_official_vqgan_state_dict():
    vq = oracle.diffusers_vqgan(seed=4)
    official = oracle.official_vqgan_state_dict(vq)
    assert "vquantizer.codebook.weight" in official and "vquantizer.embedding.weight" not in official
    assert len(official) == len(vq.state_dict())
    assert torch.equal(official["vquantizer.codebook.weight"], vq.vquantizer.embedding.weight)


def test_randomize_is_seeded_and_complete():
    a = oracle.diffusers_unet(oracle.DECODER_CONFIGS["b_tiny"], seed=5)
    b = oracle.diffusers_unet(oracle.DECODER_CONFIGS["b_tiny"], seed=5)
    c = oracle.diffusers_unet(oracle.DECODER_CONFIGS["b_tiny"], seed=6)
    assert not a.training
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(torch.equal(sa[k], sc[k]) for k in sa)
    assert all(v.abs().sum() > 0 for k, v in sa.items() if "channelwise.2." in k)  # GRN gamma/beta not zero
    vq = oracle.diffusers_vqgan(seed=7)
    bn = vq.down_blocks[-1][1]
    assert not vq.training and (bn.running_var >= 0.5).all() and bn.running_mean.abs().sum() > 0


def test_save_diffusers_folders(tc, tmp_path):
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    prior_dir, decoder_dir = oracle.save_diffusers_folders(tc, tmp_path)
    assert (prior_dir, decoder_dir) == (tmp_path / "prior", tmp_path / "decoder")
    for d, sub in ((prior_dir, "prior"), (decoder_dir, "decoder"), (decoder_dir, "vqgan")):
        assert (d / sub / "config.json").is_file() and (d / sub / "diffusion_pytorch_model.safetensors").is_file()
    for d in (prior_dir / "image_encoder", prior_dir / "feature_extractor", prior_dir / "scheduler"):
        assert d.is_dir()
    assert json.loads((decoder_dir / "model_index.json").read_text())["vqgan"] == ["diffusers", "PaellaVQModel"]
    assert json.loads((prior_dir / "prior" / "config.json").read_text())["clip_image_in_channels"] == oracle.IMG_PROJ

    for d in (prior_dir, decoder_dir):
        tok = AutoTokenizer.from_pretrained(d / "tokenizer")
        assert tok.model_max_length == 77 and tok.pad_token == "!"
        for text in ["an image of a shiba inu, donning a spacesuit and helmet", "wow!", ""]:
            kw = dict(padding="max_length", max_length=77, truncation=True)
            assert tok(text, **kw).input_ids == tc.tokenizer(text, **kw).input_ids
        te = CLIPTextModelWithProjection.from_pretrained(d / "text_encoder")
        ref = tc.text_encoder.state_dict()
        assert set(te.state_dict()) == set(ref)
        assert all(torch.equal(v, ref[k]) for k, v in te.state_dict().items())


def test_combined_pipeline_end_to_end_and_deterministic(tc):
    pipe = oracle.combined_pipeline(tc)
    prompts = ["a photo of a cat", "a red car on a street"]
    kw = dict(prompt=prompts, height=256, width=256, prior_num_inference_steps=3, num_inference_steps=2,
              output_type="pt")
    first = pipe(generator=_gen(0), **kw).images
    again = pipe(generator=_gen(0), **kw).images
    other = pipe(generator=_gen(1), **kw).images
    assert isinstance(first, torch.Tensor) and first.shape == (2, 3, 256, 256) and first.dtype == torch.float32
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])

    # combined == prior then decoder sharing one generator (decoder continues the prior's random stream)
    g = _gen(0)
    po = oracle.prior_pipeline(tc)(prompt=prompts, height=256, width=256, num_inference_steps=3, generator=g)
    assert po.image_embeddings.shape == (2, 16, 6, 6)
    manual = oracle.decoder_pipeline(tc)(
        image_embeddings=po.image_embeddings, prompt_embeds=po.prompt_embeds,
        prompt_embeds_pooled=po.prompt_embeds_pooled, negative_prompt_embeds=po.negative_prompt_embeds,
        negative_prompt_embeds_pooled=po.negative_prompt_embeds_pooled, num_inference_steps=2,
        output_type="pt", generator=g).images
    assert torch.equal(first, manual)
