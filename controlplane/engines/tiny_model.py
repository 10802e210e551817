"""Build a tiny Llama-architecture model with random weights and a locally trained tokenizer.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on text generated here from a
seeded word list, and the weights are drawn from a seeded generator. The same seed gives the same
files, and a finished build is cached (a stamp file records the recipe), so tests build it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

STAMP = "controlplane-tiny.json"

# A small fixed vocabulary of words for the training corpus. Random weights make the model's
# output meaningless anyway; the tokenizer only needs realistic byte-pair statistics.
_WORDS = (
    "the a an of to in and or is are was were be been being have has had do does did will would can "
    "could should may might must shall request replica token latency queue prefill decode batch "
    "cache memory block engine server model serving scheduler budget error rate window alert page "
    "ticket burn objective percentile histogram counter gauge sample trace span metric label value "
    "time first output input prompt completion stream client router drain restart health ready live "
    "scale up down node cluster host port process thread core gpu cpu fleet plane control tune "
    "search cost price hour million second minute day week month system data store table row column "
    "index query insert select update delete commit write read file path config spec version name "
    "kind field default allowed unknown missing failed hello world language large small tiny fast "
    "slow high low good bad new old open close start stop run walk talk think make take give find "
    "tell ask work seem feel try leave call keep"
).split()


@dataclass(frozen=True)
class TinyModelSpec:
    seed: int = 0
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    corpus_sentences: int = 20_000

    def recipe_hash(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _corpus(spec: TinyModelSpec) -> Iterator[str]:
    rng = random.Random(spec.seed)
    for _ in range(spec.corpus_sentences):
        n = rng.randint(4, 24)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99_999)))
        yield " ".join(words).capitalize() + rng.choice((".", ".", "?", "!"))


def is_built(out: Path, spec: TinyModelSpec) -> bool:
    stamp = out / STAMP
    if not stamp.is_file():
        return False
    try:
        return bool(json.loads(stamp.read_text()).get("recipe") == spec.recipe_hash())
    except (OSError, ValueError):
        return False


def make_tiny_model(
    out: Path, spec: TinyModelSpec | None = None, progress: Callable[[str], None] = lambda _: None
) -> tuple[Path, bool]:
    """Build the model into `out`; returns (out, built_now). Reuses a finished build with the same recipe.
    Builds into one directory are serialised by a lock file beside it (the demo and the tests may build at once).
    Raises NotADirectoryError, before building, when `out` is a file."""
    spec = spec or TinyModelSpec()
    if out.exists() and not out.is_dir():  # found before a build of minutes, not when its result is moved in
        raise NotADirectoryError(20, "exists and is not a directory", str(out))
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():  # mkdir would say "File exists", naming nothing
        raise NotADirectoryError(20, f"Not a directory: {above}", str(above))
    if is_built(out, spec):  # no lock needed to reuse (and a read-only place may allow no lock file)
        progress(f"reusing tiny model in {out}")
        return out, False
    out.parent.mkdir(parents=True, exist_ok=True)
    where = out.resolve()  # `.` has no name to put a lock file beside
    with where.with_name(where.name + ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if is_built(out, spec):  # built by the holder of the lock before us
            progress(f"reusing tiny model in {out}")
            return out, False
        return out, _build(out, spec, progress)


def _build(out: Path, spec: TinyModelSpec, progress: Callable[[str], None]) -> bool:
    # Heavy imports only when building.
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    progress("training byte-level BPE tokenizer on generated local text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<unk>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec), trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fast.model_max_length = spec.max_position_embeddings
    fast.save_pretrained(tmp)

    progress("initialising Llama weights from the seed")
    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[no-untyped-call,arg-type]
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / STAMP).write_text(json.dumps({"recipe": spec.recipe_hash(), "spec": asdict(spec)}, indent=2))

    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    progress(f"tiny model written to {out}")
    return True
