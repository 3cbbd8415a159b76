"""The sentencepiece tokenizer the whole project uses, and the JSON sidecar with its special ids.

`P.model` is a sentencepiece model trained with byte fallback (every byte string encodes; no
<unk> on unseen characters). Beside it, `P.tokenizer.json` records the ids the rest of the
project needs, so nobody hard-codes them:
    {"vocab_size": 32000, "pad": 0, "unk": 1, "bos": 2, "eos": 3, "eod": 3, "model_type": "bpe", ...}
EOD (appended after each document by `preprocess --append-eod`) is the sentencepiece EOS id, as in
Megatron's SentencePiece tokenizer. Only sentencepiece is imported here (the preprocess start-up
budget is under a second).
"""
import os

import sentencepiece

from data_tools.errors import DataError
from data_tools.indexed import check_output_prefix, publish, read_json_object, write_json
from data_tools.staging import claim_staging_path

SIDECAR_SUFFIX = ".tokenizer.json"
# Fixed special ids: pad first so that an all-zero buffer reads as padding.
SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}


def sidecar_path(model_path: str) -> str:
    base = model_path[: -len(".model")] if model_path.endswith(".model") else model_path
    return base + SIDECAR_SUFFIX


class SentencePieceTokenizer:
    """encode/decode plus the special ids (`vocab_size`, `eod`, `pad`, `bos`, `eos`, `unk`)."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise DataError(f"tokenizer model {model_path} does not exist")
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (OSError, RuntimeError) as error:
            raise DataError(f"{model_path}: not a sentencepiece model ({error})") from None
        self.model_path = model_path
        self.vocab_size = self.processor.vocab_size()
        ids = {
            "pad": self.processor.pad_id(),
            "unk": self.processor.unk_id(),
            "bos": self.processor.bos_id(),
            "eos": self.processor.eos_id(),
        }
        ids["eod"] = ids["eos"]
        sidecar = sidecar_path(model_path)
        if os.path.exists(sidecar):
            recorded = read_json_object(sidecar)
            if recorded.get("vocab_size") != self.vocab_size:
                raise DataError(f"{sidecar} says vocab_size {recorded.get('vocab_size')} but "
                                f"{model_path} has {self.vocab_size}: the sidecar belongs to another model")
            for key in ids:
                if key in recorded:
                    value = recorded[key]
                    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value < self.vocab_size:
                        raise DataError(f"{sidecar}: {key} {value!r} is not an id of {model_path} "
                                        f"(0 to {self.vocab_size - 1}, or -1 for none)")
                    ids[key] = value
        if ids["eod"] < 0:
            raise DataError(f"{model_path} has no EOS piece to use as EOD; retrain it with "
                            f"data_tools.train_tokenizer")
        self.pad, self.unk, self.bos, self.eos, self.eod = (
            ids["pad"], ids["unk"], ids["bos"], ids["eos"], ids["eod"])

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.processor.encode(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.processor.decode([int(token) for token in ids])

    def special_ids(self) -> dict:
        return {"vocab_size": self.vocab_size, "pad": self.pad, "unk": self.unk,
                "bos": self.bos, "eos": self.eos, "eod": self.eod}


def load_tokenizer(model_path: str) -> SentencePieceTokenizer:
    """The project's tokenizer from a sentencepiece `.model` (and its sidecar, when present)."""
    return SentencePieceTokenizer(model_path)


def train_sentencepiece(sentences, model_prefix: str, vocab_size: int, model_type: str = "bpe",
                        num_threads: int = 2, extra_options: dict | None = None) -> SentencePieceTokenizer:
    """Train a byte-fallback sentencepiece model from an iterable of strings; write the sidecar.

    Returns the loaded tokenizer. Sentencepiece's own failures (for instance a vocabulary larger
    than the text supports) become DataError with its message. The files are written under a
    temporary prefix and renamed into place only when all three exist, so a failed or interrupted
    run leaves no model (and an existing model at `model_prefix` stays as it was).
    """
    check_output_prefix(model_prefix, "--model-prefix")
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"--model-type {model_type!r}: choose bpe or unigram")
    # (a killed run's `<prefix>.tmp-<host>-<pid>.model` and the rest go first)
    temporary_prefix = claim_staging_path(model_prefix)
    temporary_files = [temporary_prefix + suffix for suffix in (".model", ".vocab", SIDECAR_SUFFIX)]
    options = dict(
        model_prefix=temporary_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=0.9995,
        pad_id=SPECIAL_IDS["pad"],
        unk_id=SPECIAL_IDS["unk"],
        bos_id=SPECIAL_IDS["bos"],
        eos_id=SPECIAL_IDS["eos"],
        num_threads=num_threads,
        # Lines up to 64 KiB are training sentences; sentencepiece's default (4 KiB) drops long ones.
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    options.update(extra_options or {})
    try:
        _train_and_publish(sentences, options, model_type, model_prefix, temporary_prefix)
    finally:
        for path in temporary_files:
            if os.path.exists(path):
                os.remove(path)
    return load_tokenizer(model_prefix + ".model")


def _train_and_publish(sentences, options, model_type, model_prefix, temporary_prefix) -> None:
    try:
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sentences), **options)
    except RuntimeError as error:
        message = " ".join(str(error).split())
        raise DataError(f"sentencepiece training failed: {message}") from None
    model_path = model_prefix + ".model"
    processor = sentencepiece.SentencePieceProcessor(model_file=temporary_prefix + ".model")
    sidecar = {
        "vocab_size": processor.vocab_size(),
        "pad": processor.pad_id(),
        "unk": processor.unk_id(),
        "bos": processor.bos_id(),
        "eos": processor.eos_id(),
        "eod": processor.eos_id(),
        "model_type": model_type,
        "byte_fallback": True,
        "model_file": os.path.basename(model_path),
    }
    write_json(temporary_prefix + SIDECAR_SUFFIX, sidecar)
    # The model last: whoever finds the new model also finds its sidecar.
    publish([(temporary_prefix + ".vocab", model_prefix + ".vocab"),
             (temporary_prefix + SIDECAR_SUFFIX, sidecar_path(model_path)),
             (temporary_prefix + ".model", model_path)])
