"""The official ``sample_video.py`` next to ``hvlab generate``: its flags, and what it does that hvlab does not.

One place for the mapping that notebook 17 shows and ``tests/test_official.py`` keeps true (every hvlab flag
named here must parse). Flag names and defaults were read from the official ``hyvideo/config.py``; the blog's
§2.3 lists the ten it uses.

Each row of `OFFICIAL_FLAGS`: (official flag, official default, the ``hvlab generate`` flag or None, note).
None means hvlab's command line has no counterpart; the note says where the setting lives instead, or why
there is none.
"""
from __future__ import annotations

OFFICIAL_FLAGS: tuple[tuple[str, str, str | None, str], ...] = (
    # --- what the blog's command uses (§2.3) ---
    ("--prompt", "None", "PROMPT", "positional in hvlab"),
    ("--video-size", "720 1280", "--video-size", "H W in both (the blog's `--video-size 1280 720` asks for a "
     "portrait 1280 x 720 video); the official CLI also takes one number for a square and rounds both up to a "
     "multiple of 16, hvlab needs two and refuses other sizes (hvlab.video.align_to gives the official size)"),
    ("--video-length", "129", "--video-length", "4k + 1 frames in both"),
    ("--infer-steps", "50", "--infer-steps", ""),
    ("--seed", "None", "--seed", "unset: official draws a random seed in [0, 10^6], hvlab in [0, 2^31) and records it"),
    ("--embedded-cfg-scale", "6.0", "--embedded-cfg-scale", "6.0 enters the DiT as 6016.0 (bf16) in both"),
    ("--flow-shift", "7.0", "--flow-shift", ""),
    ("--flow-reverse", "False", "--flow-reverse", "official default off but every official command passes it; hvlab's "
     "release default is on (--no-flow-reverse for the official default)"),
    ("--use-cpu-offload", "False", "--cpu-offload", "official: every module (the DiT too) waits on the CPU and "
     "visits the GPU while it runs; hvlab: text encoders and VAE only (the DiT's blocks: "
     "hvlab.fast.offload.BlockOffloader, no flag yet)"),
    ("--use-fp8", "False", "--fp8", "hvlab reads the _fp8.pt + _fp8_map.pt pair under --model-base when present, "
     "else quantises the bf16 weights while loading"),
    ("--save-path", "./results", "--save-path", "official: timestamped mp4 files in one folder; hvlab: one folder "
     "per run (video.mp4, settings.json, latents.pt, previews)"),
    ("--dit-weight", "ckpts/.../mp_rank_00_model_states.pt", None, "hvlab finds the DiT file in the release "
     "layout under --model-base (hvlab.loading.RELEASE_FILES)"),
    ("--ulysses-degree", "1", "--ulysses-degree", "launch with torchrun in both"),
    ("--ring-degree", "1", None, "hvlab splits the sequence with Ulysses only"),
    # --- the rest of the official parser ---
    ("--model-base", "ckpts", "--model-base", "hvlab's default is the shipped toy model; --model-base loads the release"),
    ("--neg-prompt", "None", "--neg-prompt", "used only with --cfg-scale > 1; an empty string: official uses the "
     "default negative prompt, hvlab an empty one (unset: the default in both)"),
    ("--cfg-scale", "1.0", "--cfg-scale", "true CFG, negative half first in the batch in both"),
    ("--num-videos", "1", "--num-videos", "video i gets seed + i in both"),
    ("--batch-size", "1", None, "one prompt per command; several prompts through the Python API"),
    ("--precision", "bf16", "--dtype", ""),
    ("--vae-precision", "fp16", None, "load_pipeline(vae_dtype=...)"),
    ("--text-encoder-precision", "fp16", None, "load_pipeline(text_encoder_dtype=...)"),
    ("--text-encoder-precision-2", "fp16", None, "load_pipeline(text_encoder_dtype=...), shared with the LLM"),
    ("--vae-tiling", "True (cannot be turned off)", "--vae-tiling", "also --no-vae-tiling and --vae-tile-size PX FRAMES"),
    ("--model", "HYVideo-T/2-cfgdistill", None, "the only released DiT: hvlab.model.HYVIDEO_T2_CONFIG"),
    ("--latent-channels", "16", None, "in the config"),
    ("--rope-theta", "256", None, "HYVideoConfig.rope_theta"),
    ("--vae", "884-16c-hy", None, "the only released VAE: hvlab.vae.VAE_884_16C_HY_CONFIG"),
    ("--text-encoder / --tokenizer", "llm", None, "the folder text_encoder/ of the layout"),
    ("--text-encoder-2 / --tokenizer-2", "clipL", None, "the folder text_encoder_2/ of the layout"),
    ("--text-states-dim / --text-states-dim-2", "4096 / 768", None, "in the config"),
    ("--text-len / --text-len-2", "256 / 77", None, "load_llm_encoder(max_length=...) / load_clip_encoder(max_length=...)"),
    ("--prompt-template-video", "dit-llm-encode-video", None, "load_llm_encoder(template=...)"),
    ("--prompt-template", "dit-llm-encode", None, "the image template: official uses it for --video-length 1; "
     "hvlab keeps the video template (hvlab.prompts.template_for gives the official choice)"),
    ("--hidden-state-skip-layer", "2", None, "load_llm_encoder(hidden_state_skip_layer=...)"),
    ("--apply-final-norm", "False", None, "load_llm_encoder(apply_final_norm=...)"),
    ("--denoise-type / --flow-solver", "flow / euler", None, "the only ones the release uses"),
    ("--use-linear-quadratic-schedule / --linear-schedule-end", "False / 25", None, "not implemented"),
    ("--model-resolution", "540p", None, "unused by the official sampler"),
    ("--load-key", "module", None, "hvlab reads 'module' (or 'ema' when 'module' is absent)"),
    ("--seed-type", "auto", None, "prompt files are not supported"),
    ("--save-path-suffix / --name-suffix", "''", None, "hvlab names the run folder by time; --save-path chooses it"),
    ("--disable-autocast", "False", None, "hvlab does not autocast: the DiT runs in --dtype"),
    ("--reproduce", "False", None, "hvlab's noise depends only on the seed (one CPU generator per video)"),
)
"""(official flag, official default, ``hvlab generate`` flag or None, note), the blog's flags first."""


def hvlab_flags() -> list[str]:
    """The ``hvlab generate`` options named in `OFFICIAL_FLAGS` (the positional PROMPT left out)."""
    return sorted({h for _, _, h, _ in OFFICIAL_FLAGS if h and h.startswith("--")})
