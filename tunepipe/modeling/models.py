"""TokenizerModules and ModelModules: load from a local path / hub id / the bundled encoder, or build from config."""
from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path
from typing import Any

from ..data import DatasetModules
from ..errors import ConfigError, ErrorHandler, ModelError, ModelNotFoundError, TaskTypeError
from ..suggest import suggest
from ..tasks import get_task
from ..tiny import TOKENIZER_TRAINERS
from .limits import check_lengths
from .model_paths import (  # noqa: F401 - importable from here as before
    ARCHITECTURE_TASKS,
    BUNDLED_ALIASES,
    BUNDLED_HUB_ID,
    _offline,
    bundled_copy,
    bundled_model_dir,
    check_model_dir,
    check_tokenizer_dir,
    encoder_decoder_sides,
    resolve_model_path,
    task_from_model_dir,
)
from .peft_support import finish_model, is_adapter_dir, read_adapter_info, resolve_base
from .quantization import QuantizationManager
from .special_tokens import add_special_tokens, resize_embeddings


def _damaged_weights(exc: Exception, path: str, field: str) -> ModelError | None:
    """safetensors' 'incomplete metadata' / 'header too large' for a truncated or damaged weights file."""
    if type(exc).__name__ != "SafetensorError" and "deserializing header" not in str(exc):
        return None
    weights = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    return ModelError(f"The model's weights cannot be read (truncated or damaged file): {str(exc).splitlines()[0]}",
                      field=field, file=str(weights[0]) if len(weights) == 1 else path,
                      suggestions=["copy the model again (an interrupted download or copy cuts files short), or "
                                   "re-save it with save_pretrained"])


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "vocab.json", "config.json")


def tokenizer_load_error(exc: Exception, name: str, field: str) -> Exception:
    """A typed error for a tokenizer that failed to load: a damaged JSON file in a local tokenizer directory is
    named with its line (instead of a raw JSONDecodeError), anything else a local directory cannot give is a
    ModelError on that directory; names that are not found keep _load_error's MODEL_NOT_FOUND."""
    directory = Path(name)
    if directory.is_dir():
        for fname in TOKENIZER_JSON_FILES:
            path = directory / fname
            if not path.is_file():
                continue
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                return ModelError(f"The tokenizer file {fname} is damaged: {str(e).splitlines()[0]}", field=field,
                                  file=str(path), line=getattr(e, "lineno", None),
                                  suggestions=["copy the tokenizer again (an interrupted copy or download cuts "
                                               "files short), or re-save it with save_pretrained"])
    if isinstance(exc, (ImportError, MemoryError)):
        return ErrorHandler.translate(exc, f"loading the tokenizer '{name}'")
    err = _load_error(exc, name, "tokenizer", field=field)
    if directory.is_dir() and not isinstance(err, (ModelNotFoundError, TaskTypeError)):
        tokenizer_json = directory / "tokenizer.json"
        return ModelError(f"The tokenizer in {name} cannot be loaded: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}", field=field,
                          file=str(tokenizer_json if tokenizer_json.is_file() else directory),
                          suggestions=["re-save the tokenizer with save_pretrained (tokenizers' version may differ "
                                       "from the one that wrote it)", "or point the field at another tokenizer"])
    return err


def _load_error(exc: Exception, name: str, what: str, field: str = "model.name_or_path") -> Exception:
    text = str(exc)
    if isinstance(exc, (OSError, ValueError)) and ("offline" in text.lower() or "does not appear" in text
                                                    or "not a valid" in text or "Can't load" in text
                                                    or "couldn't connect" in text.lower() or "not found" in text.lower()
                                                    or "Repository" in text):
        return ModelNotFoundError(f"Could not load the {what} '{name}': {text.splitlines()[0]}",
                                  field=field,
                                  suggestions=["check the name or local path",
                                               "HF_HUB_OFFLINE=1 is set: only local directories and the local cache "
                                               "are used; download the model where there is network (or unset "
                                               "HF_HUB_OFFLINE), or use 'minilm'" if _offline() else
                                               "no network to the hub? use a local directory, or 'minilm'"])
    if "Unrecognized configuration class" in text:
        return TaskTypeError(f"The model '{name}' has no head for this task: {text.splitlines()[0]}",
                             field="model.name_or_path", suggestions=["choose a model architecture that supports it"])
    return ErrorHandler.translate(exc, f"loading the {what} '{name}'")


class TokenizerModules:
    def __init__(self, specs):
        self.specs = specs

    def source(self) -> str:
        name = self.specs.tokenizer.name_or_path or self.specs.model.name_or_path
        if name is None and self.specs.model.encoder_decoder:
            name = encoder_decoder_sides(self.specs.model.encoder_decoder)[0]  # the encoder reads the source text
        if name is None and not self.specs.model.from_config:
            raise ConfigError("No model given", field="model.name_or_path",
                              suggestions=["set model.name_or_path (local dir, hub id, or 'minilm')",
                                           "or model.from_config for a fresh model"])
        if name is None:
            raise ConfigError("No tokenizer: a model built from_config needs tokenizer.name_or_path",
                              field="tokenizer.name_or_path",
                              suggestions=["point tokenizer.name_or_path at a tokenizer directory or 'minilm'",
                                           "or train one on the training text: tokenizer: {train: {type: wordpiece}}"])
        path = resolve_model_path(name, self.field())
        check_tokenizer_dir(path, self.field())
        return path

    def field(self) -> str:
        """The specs field the tokenizer comes from (for error messages)."""
        return "tokenizer.name_or_path" if self.specs.tokenizer.name_or_path else "model.name_or_path"

    def load(self, task=None):
        from transformers import AutoTokenizer
        name = self.train(task) if self.specs.tokenizer.train else self.source()
        kwargs: dict[str, Any] = {"use_fast": self.specs.tokenizer.use_fast,
                                  "trust_remote_code": self.specs.model.trust_remote_code}
        if self.specs.model.revision and not self.specs.tokenizer.name_or_path:
            kwargs["revision"] = self.specs.model.revision
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
            # Byte-level BPE tokenizers (RoBERTa, GPT-2) need add_prefix_space for pre-split words.
            if task is not None and task.pre_split_words and getattr(
                    tokenizer, "add_prefix_space", None) is False:
                tokenizer = AutoTokenizer.from_pretrained(name, add_prefix_space=True, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise tokenizer_load_error(e, name, self.field()) from None
        add_special_tokens(tokenizer, self.specs.tokenizer)  # before the pad fallback: a pad_token given wins
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise ModelError(f"The tokenizer '{name}' has no padding token (nor an eos or unk token to pad with): "
                             "batches cannot be padded", field=self.field(),
                             suggestions=["use a tokenizer that has a pad token (add one to its special tokens and "
                                          "save it again)",
                                          "or train one on the data: tokenizer: {train: {type: wordpiece}}"])
        if self.specs.tokenizer.padding_side:
            tokenizer.padding_side = self.specs.tokenizer.padding_side
        return tokenizer

    def train(self, task=None) -> str:
        """Train a tokenizer on the training text (``tokenizer.train``), for a model built from config; returns the
        directory it was saved to, so it is loaded exactly as plain transformers will reload it."""
        options = dict(self.specs.tokenizer.train or {})
        kind = str(options.pop("type", "wordpiece")).lower()
        if kind not in TOKENIZER_TRAINERS:
            raise ConfigError(f"Unknown tokenizer.train.type '{kind}'", field="tokenizer.train.type",
                              suggestions=[f"use one of: {', '.join(TOKENIZER_TRAINERS)} (wordpiece for BERT-style "
                                           "encoders, bpe for GPT-2/LLaMA-style decoders)"])
        if self.specs.tokenizer.name_or_path:
            raise ConfigError("tokenizer.train and tokenizer.name_or_path are both set", field="tokenizer.train",
                              suggestions=["keep one: train a new tokenizer, or load an existing one"])
        if self.specs.model.name_or_path and not self.specs.model.from_config:
            raise ConfigError("A pretrained model keeps its own tokenizer: a newly trained one would not match its "
                              "embeddings", field="tokenizer.train",
                              suggestions=["remove tokenizer.train", "or build the model with model.from_config"])
        trainer = TOKENIZER_TRAINERS[kind]
        allowed = set(inspect.signature(trainer).parameters) - {"texts", "out_dir"}
        for key in options:
            if key not in allowed:
                raise ConfigError(f"Unknown key 'tokenizer.train.{key}' for type '{kind}'",
                                  field=f"tokenizer.train.{key}",
                                  suggestions=suggest(key, allowed) or [f"'{kind}' accepts: {', '.join(sorted(allowed))}"])
        options.setdefault("vocab_size", 8000)
        if task is None:
            task = get_task(self.specs.task)(self.specs)
        rows = DatasetModules(self.specs, task).load()["train"].rows
        texts_of = getattr(task, "tokenizer_training_texts", None)
        texts = texts_of(rows) if texts_of else [
            " ".join(v) if isinstance(v, list) else v for v in (r.get(task.column("text")) for r in rows)
            if isinstance(v, (str, list))]
        if not texts:
            raise ConfigError("No training text to train the tokenizer on", field="tokenizer.train",
                              suggestions=["check data.train and data.text_column"])
        self._workdir = tempfile.TemporaryDirectory(prefix="tunepipe-tokenizer-")  # removed with this object
        with ErrorHandler.guard("training the tokenizer"):
            trainer(texts, self._workdir.name, **options)
        return self._workdir.name


class ModelModules:
    def __init__(self, specs):
        self.specs = specs

    def load(self, task, tokenizer=None):
        model = self._load(task, tokenizer)
        if tokenizer is not None:
            if self.specs.tokenizer.special_tokens or self.specs.tokenizer.additional_special_tokens:
                resize_embeddings(model, tokenizer)  # rows for the added tokens (saved with an adapter too)
            self._check_vocabulary(model, tokenizer)
        check_lengths(task, model.config)  # a length over the model's positions: refused before any training
        configure = getattr(task, "configure_model", None)  # settings the saved model must carry (generation)
        if configure is not None:
            configure(model, tokenizer)
        return finish_model(model, self.specs, task, tokenizer)

    def _check_vocabulary(self, model, tokenizer) -> None:
        """Token ids at or above the embedding size crash in the first forward pass ('index out of range')."""
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        rows = getattr(embeddings, "num_embeddings", None)
        spec = self.specs
        if rows is None or len(tokenizer) <= rows or spec.tokenizer.special_tokens or \
                spec.tokenizer.additional_special_tokens:  # added tokens: load() resizes the embeddings
            return
        field = "tokenizer.name_or_path" if spec.tokenizer.name_or_path or spec.tokenizer.train else "model.name_or_path"
        raise ModelError(f"The tokenizer has {len(tokenizer)} tokens but the model's embeddings only {rows}: the "
                         "model cannot read its ids", field=field,
                         suggestions=["use the tokenizer the model was trained with",
                                      "for a model built from config, leave model.from_config.vocab_size unset: it "
                                      "follows the tokenizer"])

    def _load(self, task, tokenizer=None):
        import transformers
        spec = self.specs.model
        if spec.encoder_decoder:
            return self._encoder_decoder(task, tokenizer)
        if spec.from_config:
            return self._from_config(task, tokenizer)
        if not spec.name_or_path:
            raise ConfigError("No model given", field="model.name_or_path",
                              suggestions=["set model.name_or_path (local dir, hub id, or 'minilm')",
                                           "or model.from_config for a fresh model"])
        name = resolve_model_path(spec.name_or_path)
        check_model_dir(name)
        adopt_model_config(task, name, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        auto_cls = getattr(transformers, task.auto_model_class)
        try:
            quantized = QuantizationManager(self.specs).load_kwargs(
                auto_cls, name, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **task.model_kwargs())
            model = auto_cls.from_pretrained(name, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                                             **task.model_kwargs(), **quantized)
        except Exception as e:  # noqa: BLE001
            if "size mismatch" in str(e):
                raise TaskTypeError(f"The head of '{name}' has a different number of labels than the data "
                                    f"({len(task.labels or [])})", field="model.name_or_path",
                                    suggestions=["start from the base model instead of a fine-tuned one",
                                                 "or set data.labels to the model's labels"]) from None
            if task.auto_model_class == "AutoModelForSeq2SeqLM" and "Unrecognized configuration class" in str(e):
                raise TaskTypeError(f"'{spec.name_or_path}' is not a sequence-to-sequence model",
                                    field="model.name_or_path",
                                    suggestions=[f"warm-start one from it: model: {{encoder_decoder: "
                                                 f"{spec.name_or_path}}}", "or use a T5/BART-style checkpoint"]
                                    ) from None
            raise _damaged_weights(e, name, "model.name_or_path") or _load_error(e, name, "model") from None
        return model

    def _from_config(self, task, tokenizer):
        import transformers
        from transformers import AutoConfig
        cfg = dict(self.specs.model.from_config)
        model_type = cfg.pop("model_type", None)
        if not model_type:
            raise ConfigError("model.from_config needs a model_type (e.g. bert)", field="model.from_config.model_type",
                              suggestions=["add model_type: bert (or gpt2, t5, ... any transformers model type)"])
        if tokenizer is not None:
            cfg.setdefault("vocab_size", len(tokenizer))
            if tokenizer.pad_token_id is not None:
                cfg.setdefault("pad_token_id", tokenizer.pad_token_id)
            for special in ("bos_token_id", "eos_token_id"):  # else GPT-2's 50256 in a small vocabulary
                if getattr(tokenizer, special, None) is not None:
                    cfg.setdefault(special, getattr(tokenizer, special))
        cfg.update(task.model_kwargs())
        try:
            config = AutoConfig.for_model(model_type, **cfg)
            task.adopt_config(config)
            return getattr(transformers, task.auto_model_class).from_config(config)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"Cannot build a '{model_type}' model from model.from_config: "
                              f"{str(e).splitlines()[0]}", field="model.from_config",
                              suggestions=["check the config keys against the transformers *Config class"]) from None

    def _encoder_decoder(self, task, tokenizer):
        """A seq2seq model warm-started from pretrained encoders (bert2bert): cross-attention is new, the rest is
        pretrained. The decoder starts from [CLS] (or <s>) and stops at [SEP] (or </s>), as the tokenizer marks text."""
        if not task.generative:
            raise TaskTypeError(f"model.encoder_decoder builds a sequence-to-sequence model; task '{task.name}' "
                                "is not one", field="model.encoder_decoder",
                                suggestions=["use model.name_or_path for this task",
                                             "or task: translation / summarization / text_generation"])
        import transformers
        encoder, decoder = (resolve_model_path(p) for p in encoder_decoder_sides(self.specs.model.encoder_decoder))
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the expected "cross-attention newly initialised" table
        try:
            model = transformers.EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder)
        except Exception as e:  # noqa: BLE001
            raise _load_error(e, f"{encoder} + {decoder}", "encoder-decoder") from None
        finally:
            transformers.logging.set_verbosity(verbosity)
        if tokenizer is not None:
            start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
            end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
            for target in (model.config, model.generation_config):
                target.decoder_start_token_id = start
                target.eos_token_id = end
                target.pad_token_id = tokenizer.pad_token_id
        return model


def read_model_config(path, **kwargs):
    """The config of a model folder, hub id (after aliases such as 'minilm') or tunepipe adapter folder (its base);
    None when it cannot be read: the real load reports that with more context."""
    from transformers import AutoConfig

    try:
        path = resolve_model_path(str(path))
        if is_adapter_dir(path):
            path = resolve_base(path, read_adapter_info(path))
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return AutoConfig.from_pretrained(path, **{"trust_remote_code": False, **kwargs})
    except Exception:  # noqa: BLE001
        return None


def adopt_model_config(task, path, **kwargs) -> None:
    """Show the task the config of the model it will get, so that it picks its model class."""
    config = read_model_config(path, **kwargs)
    if config is not None:
        task.adopt_config(config)
