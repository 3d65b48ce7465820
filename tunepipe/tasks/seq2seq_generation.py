"""The seq2seq tasks' generation settings: the specs' generation section as generate() kwargs and generation_config."""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError

BEAM_ONLY = ("length_penalty", "early_stopping", "num_beam_groups", "diversity_penalty")
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff")
# Decoder-only LMs decode greedily by default: the encoder-decoder defaults (4 beams, no_repeat_ngram_size 3) scored
# a fine-tuned decoder-only summariser lower than greedy decoding of the same model (README.md, "Tasks";
# benchmarks/results/quality_summarization_llm.json). A generation section in the specs still wins.
DECODER_ONLY_GENERATION = {"num_beams": 1, "no_repeat_ngram_size": 0}


def generation_kwargs(g) -> dict[str, Any]:
    """model.generate() kwargs from the specs' generation section ``g``, only those that apply."""
    kwargs: dict[str, Any] = {"max_new_tokens": g.max_new_tokens, "num_beams": g.num_beams,
                              "do_sample": g.do_sample, "no_repeat_ngram_size": g.no_repeat_ngram_size}
    if g.num_beams > 1:
        kwargs["length_penalty"] = g.length_penalty
        if g.early_stopping is not None:
            kwargs["early_stopping"] = g.early_stopping
    if g.min_new_tokens:
        kwargs["min_new_tokens"] = g.min_new_tokens
    if g.do_sample:
        kwargs.update({k: getattr(g, k) for k in ("temperature", "top_k", "top_p") if getattr(g, k) is not None})
    return kwargs


def configure_generation(model, tokenizer, kwargs: dict[str, Any], decoder_only: bool) -> None:
    """Set the model's start/end/pad ids (from the tokenizer where the config lacks them) and put ``kwargs`` into
    its generation_config, validated as save_pretrained will validate it."""
    config, gen = model.config, model.generation_config
    if tokenizer is not None:
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
        if decoder_only and getattr(config, "eos_token_id", None) is None:
            config.eos_token_id = tokenizer.eos_token_id  # where a completion ends
        if getattr(config, "decoder_start_token_id", None) is None and not decoder_only:
            config.decoder_start_token_id = (tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                                             else config.pad_token_id)
    if getattr(config, "decoder_start_token_id", None) is None and not decoder_only:
        raise ConfigError("The model has no decoder_start_token_id", field="model",
                          suggestions=["set decoder_start_token_id in model.from_config",
                                       "or use a tokenizer with a bos or pad token"])
    for key in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
        if getattr(gen, key, None) is None and getattr(config, key, None) is not None:
            setattr(gen, key, getattr(config, key))
    gen.update(**kwargs)
    gen.max_length = None  # max_new_tokens rules; a pretrained max_length only makes generate() warn
    # a pretrained generation_config may carry beam or sampling options the specs turn off: unset them, or
    # save_pretrained refuses the combination
    unused = (() if kwargs["num_beams"] > 1 else BEAM_ONLY) + (() if kwargs["do_sample"] else SAMPLING_ONLY)
    for key in unused:
        if key not in kwargs and getattr(gen, key, None) is not None:
            setattr(gen, key, None)
    try:
        gen.validate(strict=True)
    except ValueError as e:
        raise ConfigError(f"Invalid generation settings: {str(e).strip().splitlines()[1:2] or e}",
                          field="generation", suggestions=["check the generation section"]) from None
