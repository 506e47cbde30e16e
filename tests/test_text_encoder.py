"""TextEncoder on tiny random-weight models with the REAL tokenizers, checked against diffusers' pipeline."""
import copy
import types

import pytest
import torch
from torch import nn
from transformers import CLIPTokenizer

from hvlab.prompts import PROMPT_TEMPLATE, apply_template, validate_prompts
from hvlab.text_encoder import (TextEncoder, embedded_guidance, load_clip_encoder, load_llm_encoder,
                                tiny_clip_encoder, tiny_llm_encoder)
from hvlab.tokenizers import bytes_to_unicode, llama3_tokenizer

PROMPTS = ["A cat walks on the grass, realistic style.", "Two dogs"]
VIDEO = PROMPT_TEMPLATE["dit-llm-encode-video"]


@pytest.fixture(scope="module")
def llm():
    return tiny_llm_encoder(hidden=64, layers=4, heads=4, seed=0)  # real Llama-3 tokenizer, 8M-param embedding


@pytest.fixture(scope="module")
def clip():
    return tiny_clip_encoder(hidden=32, layers=2, seed=0)


def diffusers_pipeline_stub(**parts):
    # diffusers' HunyuanVideoPipeline methods only read these attributes from `self`.
    return types.SimpleNamespace(_execution_device=torch.device("cpu"), **parts)


# ---- LLM path ---------------------------------------------------------------------------------------

def test_llm_shapes_and_mask_count(llm):
    out = llm.encode(PROMPTS)
    assert llm.crop_start == 95
    assert out.hidden_state.shape == (2, 256, 64) and out.attention_mask.shape == (2, 256)
    tok = llm.tokenizer
    for b, prompt in enumerate(PROMPTS):
        n = len(tok(prompt, add_special_tokens=False)["input_ids"]) + 1  # + the closing <|eot_id|>
        mask = out.attention_mask[b]
        assert int(mask.sum()) == n
        assert torch.all(mask[:n] == 1) and torch.all(mask[n:] == 0)  # right padding


def test_llm_matches_diffusers_pipeline(llm):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import HunyuanVideoPipeline

    stub = diffusers_pipeline_stub(tokenizer=llm.tokenizer, text_encoder=llm.model)
    ref_states, ref_mask = HunyuanVideoPipeline._get_llama_prompt_embeds(
        stub, PROMPTS, VIDEO, device=torch.device("cpu"), dtype=torch.float32, max_sequence_length=256)
    out = llm.encode(PROMPTS)
    assert torch.equal(out.attention_mask, ref_mask)
    torch.testing.assert_close(out.hidden_state, ref_states, rtol=0, atol=0)


def test_picked_state_is_the_output_of_layer_L_minus_skip(llm):
    # Independent of hidden_states indexing: a copy of the model cut after layer L - skip, with the
    # final norm removed, must end in exactly the state the encoder picked.
    skip = llm.hidden_state_skip_layer
    cut = copy.deepcopy(llm.model)
    cut.layers = cut.layers[: len(cut.layers) - skip]
    cut.norm = nn.Identity()
    text = [apply_template(p, VIDEO) for p in PROMPTS]
    batch = llm.tokenizer(text, padding="max_length", max_length=256 + 95, truncation=True, return_tensors="pt")
    expected = cut(**batch).last_hidden_state[:, 95:]
    out = llm.encode(PROMPTS, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_state, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden_state, out.hidden_states_list[-(skip + 1)][:, 95:], atol=0, rtol=0)


def test_skip_zero_and_final_norm_variants(llm):
    text = apply_template(PROMPTS[0], VIDEO)
    batch = llm.tokenizer([text], padding="max_length", max_length=256 + 95, return_tensors="pt")
    direct = llm.model(**batch, output_hidden_states=True)
    last = TextEncoder(llm.model, llm.tokenizer, "llm", 256, template=VIDEO, hidden_state_skip_layer=0)
    torch.testing.assert_close(last.encode(PROMPTS[0]).hidden_state, direct.last_hidden_state[:, 95:])
    normed = TextEncoder(llm.model, llm.tokenizer, "llm", 256, template=VIDEO, apply_final_norm=True)
    torch.testing.assert_close(normed.encode(PROMPTS[0]).hidden_state, llm.model.norm(direct.hidden_states[-3])[:, 95:])


def test_padding_never_changes_real_tokens(llm):
    # Causal attention + right padding: a prompt's states do not depend on its batch mates.
    together = llm.encode(PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        alone = llm.encode(prompt)
        n = int(alone.attention_mask.sum())
        torch.testing.assert_close(together.hidden_state[b, :n], alone.hidden_state[0, :n], atol=1e-5, rtol=1e-5)


def test_long_prompt_is_truncated_with_a_warning_that_counts_the_loss(llm):
    prompt = "a very long prompt " * 80
    n = len(llm.tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 1  # + <|eot_id|>
    assert n > 256
    with pytest.warns(UserWarning, match=rf"is {n} tokens long .* keeps 256: the last {n - 256} tokens were dropped"):
        out = llm.encode(prompt)
    assert out.hidden_state.shape == (1, 256, 64) and int(out.attention_mask.sum()) == 256


def test_bad_prompts_and_settings(llm):
    with pytest.raises(TypeError, match="str or a list of str"):
        llm.encode(42)
    with pytest.raises(TypeError, match="item 1"):
        llm.encode(["ok", 3])
    with pytest.raises(ValueError, match="empty list"):
        llm.encode([])
    # The pipeline checks negative prompts against the batch with the same helper.
    with pytest.raises(ValueError, match="negative_prompt has 3 entries but the batch has 2"):
        validate_prompts(["a", "b", "c"], batch_size=len(PROMPTS), name="negative_prompt")
    with pytest.raises(ValueError, match=r"hidden_state_skip_layer must be in \[0, 3\]"):
        TextEncoder(llm.model, llm.tokenizer, "llm", 256, template=VIDEO, hidden_state_skip_layer=4)
    with pytest.raises(ValueError, match="kind must be"):
        TextEncoder(llm.model, llm.tokenizer, "t5", 256)
    with pytest.raises(ValueError, match="max_length must be"):
        TextEncoder(llm.model, llm.tokenizer, "llm", 0)


def test_tiny_llm_is_seeded_and_leaves_the_global_rng_alone():
    tok = llama3_tokenizer()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = tiny_llm_encoder(tok, hidden=16, layers=2, heads=2, seed=5), tiny_llm_encoder(tok, hidden=16, layers=2, heads=2, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


# ---- CLIP path --------------------------------------------------------------------------------------

def test_clip_pooled_matches_diffusers_and_pooler_output(clip):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import HunyuanVideoPipeline

    out = clip.encode(PROMPTS)
    assert out.hidden_state.shape == (2, 32) and out.attention_mask.shape == (2, 77)
    stub = diffusers_pipeline_stub(tokenizer_2=clip.tokenizer, text_encoder_2=clip.model)
    ref = HunyuanVideoPipeline._get_clip_prompt_embeds(stub, PROMPTS, device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(out.hidden_state, ref, atol=1e-5, rtol=1e-5)
    assert [int(m.sum()) for m in out.attention_mask] == [len(clip.tokenizer(p)["input_ids"]) for p in PROMPTS]


def test_clip_pools_at_the_first_eos_even_when_eos_id_is_2():
    # transformers treats eos_token_id == 2 as a legacy config and pools at the LARGEST id instead.
    # A vocabulary whose EOS really is id 2 must still pool at the EOS.
    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|pad|>": 1, "<|endoftext|>": 2}
    for c in chars + [c + "</w>" for c in chars]:
        vocab[c] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|pad|>", model_max_length=16)
    assert tok.eos_token_id == 2
    enc = tiny_clip_encoder(tok, hidden=16, layers=1, max_length=16)
    out = enc.encode(["hi there"])
    ids = tok(["hi there"], padding="max_length", max_length=16, return_tensors="pt")
    full = enc.model(**ids)
    eos_pos = int((ids["input_ids"][0] == 2).nonzero()[0])
    torch.testing.assert_close(out.hidden_state[0], full.last_hidden_state[0, eos_pos])
    assert not torch.allclose(out.hidden_state, full.pooler_output)  # the legacy rule picks a letter


def test_clip_refuses_a_template(clip):
    with pytest.raises(ValueError, match="template=None"):
        TextEncoder(clip.model, clip.tokenizer, "clip", 77, template=VIDEO)


# ---- loaders ----------------------------------------------------------------------------------------

def test_loaders_explain_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json.*LlavaForConditionalGeneration"):
        load_llm_encoder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="clip-vit-large-patch14"):
        load_clip_encoder(tmp_path / "nope")


def test_load_llm_encoder_from_a_saved_folder(tmp_path):
    src = tiny_llm_encoder(hidden=16, layers=3, heads=2, seed=1)
    src.model.save_pretrained(tmp_path)
    src.tokenizer.save_pretrained(tmp_path)
    loaded = load_llm_encoder(tmp_path, dtype=torch.float32)
    assert loaded.crop_start == 95 and loaded.hidden_state_skip_layer == 2
    torch.testing.assert_close(loaded.encode(PROMPTS).hidden_state, src.encode(PROMPTS).hidden_state)


def test_load_llm_encoder_takes_the_language_model_of_a_llava_folder(tmp_path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = llama3_tokenizer()
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                num_attention_heads=2, num_key_value_heads=2),
        image_token_index=len(tok) - 1)
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config)
    llava.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_llm_encoder(tmp_path, dtype=torch.float32)
    language_model = llava.model.language_model
    assert type(loaded.model).__name__ == "LlamaModel"
    ref = TextEncoder(language_model, tok, "llm", 256, template=VIDEO)
    torch.testing.assert_close(loaded.encode(PROMPTS).hidden_state, ref.encode(PROMPTS).hidden_state)


def test_load_clip_encoder_from_a_saved_folder(tmp_path, clip):
    clip.model.save_pretrained(tmp_path)
    clip.tokenizer.save_pretrained(tmp_path)
    loaded = load_clip_encoder(tmp_path, dtype=torch.float32)
    torch.testing.assert_close(loaded.encode(PROMPTS).hidden_state, clip.encode(PROMPTS).hidden_state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to show the weights leaving it")
def test_on_device_encodes_on_the_gpu_then_offloads(clip):
    from hvlab.fast.offload import on_device

    with on_device(clip, "cuda") as enc:
        out = enc.encode(PROMPTS)
        assert out.hidden_state.is_cuda
    assert clip.device.type == "cpu"


# ---- embedded guidance ------------------------------------------------------------------------------

def test_embedded_guidance_rounds_like_bf16():
    g = embedded_guidance(6.0)
    assert g.dtype == torch.bfloat16 and g.shape == (1,)
    # bf16 keeps 8 significant bits: between 4096 and 8192 the spacing is 32, and 6000 / 32 = 187.5
    # rounds (to even) to 188 -> 6016.
    assert float(g) == 188 * 32 == 6016.0
    assert float(embedded_guidance(6.0, dtype=torch.float32)) == 6000.0
    assert embedded_guidance(1.0, batch_size=3).tolist() == [1000.0] * 3  # 1000 / 8 = 125: exact in bf16
    with pytest.raises(TypeError, match="scale must be a number"):
        embedded_guidance("6")
