"""Second moment of MLP keys, ``C = E[k k^T]``, for the rank-one editors.

A key is the MLP hidden activation ``blocks.{layer}.mlp.hook_post`` at one token. ``C`` is
accumulated streaming over a text corpus (every token of every text, BOS excluded; texts batched by
length, the forward stopped at the key), each batch's ``k^T k`` in float32 and their sum in float64
(``precision="float64"`` keeps the products in float64 too), so memory stays at one
``[d_mlp, d_mlp]`` matrix plus one batch of activations. Results are cached
on disk, keyed by a fingerprint of the model, the layer, the corpus and the number of texts.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import itertools
import json
import logging
import os
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from relation_lens import presets
from relation_lens.data import load_world, world_dir
from relation_lens.distributed import all_reduce_sum, ranks
from relation_lens.errors import DataError, EditError, UnsupportedModelError
from relation_lens.guards import model_lock
from relation_lens.model_interface import Model, embed, parameter_fingerprint_items, run_blocks, tokenizer_of
from relation_lens.results import ValueEquality
from relation_lens.spans import right_pad

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where relation_lens caches what it computes: ``$RELATION_LENS_CACHE`` or ``~/.cache/relation_lens``."""
    return Path(os.environ.get("RELATION_LENS_CACHE", Path.home() / ".cache" / "relation_lens"))


def cache_dir() -> Path:
    """Where statistics are cached: ``stats`` under :func:`cache_root`."""
    return cache_root() / "stats"


def line_fingerprint(model: Model, upto_layer: int | None = None) -> str:
    """A short hash of the model's name, shape and the weights that determine keys up to ``upto_layer``,
    as this TransformerLens line lays them out (the lines process weights differently, so the same
    checkpoint gives another hash on each: :func:`model_fingerprint` identifies the checkpoint instead)."""
    h = hashlib.sha256(json.dumps([model.cfg.model_name, model.cfg.n_layers, model.cfg.d_model, model.cfg.d_mlp,
                                   model.cfg.d_vocab, str(model.cfg.dtype)]).encode())
    for name, p in parameter_fingerprint_items(model):
        if upto_layer is not None and name.startswith("blocks."):
            if int(name.split(".")[1]) > upto_layer:
                continue
        flat = p.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# models loaded from files: the digest of their weight files, and each layer's line fingerprint at load
_LOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def record_loaded_weights(model: Model, source_digest: str) -> None:
    """Note that ``model`` holds, as loaded, the weights of the files with ``source_digest`` (called by
    :func:`relation_lens.load_model`): :func:`model_fingerprint` then names the checkpoint, the same on
    both TransformerLens lines, for as long as the weights it covers are the loaded ones."""
    at_load: dict[int | None, str] = {layer: line_fingerprint(model, layer) for layer in range(model.cfg.n_layers)}
    at_load[None] = line_fingerprint(model, None)
    _LOADED[model] = (source_digest, at_load)


def model_fingerprint(model: Model, upto_layer: int | None = None) -> str:
    """A short hash of the weights that determine keys up to ``upto_layer`` (all weights for ``None``):
    what key statistics, update files and checkpoints are keyed by. A model loaded by
    :func:`relation_lens.load_model` whose weights up to that layer are still the loaded ones gets a hash
    of its weight files, its dtype and the layer, the same on both TransformerLens lines (so statistics
    and update files move between them; the keys agree to float rounding); a changed model (an applied
    edit below the layer, a cast) or one built in memory gets :func:`line_fingerprint`."""
    line = line_fingerprint(model, upto_layer)
    loaded = _LOADED.get(model) if _weakrefable(model) else None
    if loaded is None or loaded[1].get(upto_layer) != line:
        return line
    h = hashlib.sha256(json.dumps(["weights", loaded[0], model.cfg.model_name, str(model.cfg.dtype),
                                   "all" if upto_layer is None else upto_layer]).encode())
    return h.hexdigest()[:16]


def _weakrefable(model: Any) -> bool:
    try:
        weakref.ref(model)
    except TypeError:
        return False
    return True


def default_corpus() -> list[str]:
    """The default model's own training text: every fact under every training template."""
    return [f"{t.format(f.subject)} {f.object}." for f in load_world() for t in f.train_templates]


WIKIPEDIA_CORPUS = "FewRel 1.0 val_wiki Wikipedia sentences (MIT)"


def wikipedia_corpus() -> list[str]:
    """The 11,200 Wikipedia sentences of FewRel 1.0's validation split (MIT; vendored by
    experiments/vendor/wikipedia_sentences.py): the default corpus for every model but the embedded one,
    which ROME's statistics stand for (ROME takes them over Wikipedia text)."""
    with gzip.open(world_dir() / "wikipedia_sentences.txt.gz", "rt", encoding="utf-8", newline="\n") as f:
        return [line for line in f.read().split("\n") if line.strip()]


def model_corpus(model: Model) -> tuple[list[str], str]:
    """The corpus key statistics take by default on ``model`` and its name: the embedded model's own
    training text on the embedded model (the only text it knows), Wikipedia sentences on any other."""
    if presets.is_default_model(model):
        return default_corpus(), "the default model's world text (its training sentences)"
    return wikipedia_corpus(), WIKIPEDIA_CORPUS


def _read_text_file(path: Path) -> list[str]:
    """One text per non-empty line; a ``.jsonl`` file's lines are JSON objects with a ``text`` field."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line)["text"])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"line {i + 1} of {path} is not a JSON object with a 'text' field") from None
    return out


def _texts(corpus, n_texts: int | None) -> list[str]:
    if isinstance(corpus, (str, Path)):
        if not Path(corpus).is_file():
            raise DataError(f"corpus {str(corpus)[:80]!r} is not a file; give a text file (one text per line, or "
                            ".jsonl with a 'text' field), a list of strings or a datasets.Dataset")
        texts = _read_text_file(Path(corpus))
    elif getattr(corpus, "column_names", None) is not None and hasattr(corpus, "__len__"):  # datasets.Dataset
        if "text" not in corpus.column_names:
            raise DataError(f"corpus dataset has columns {corpus.column_names}; it needs a 'text' column")
        texts = list(corpus["text"])
    elif not hasattr(corpus, "__len__"):  # a stream (datasets.IterableDataset, a generator): its first n_texts
        if n_texts is None:
            raise DataError("a streamed corpus needs n_texts= (how many texts to read from it)")
        texts = [t["text"] if isinstance(t, dict) else t for t in itertools.islice(corpus, n_texts)]
        n_texts = None
    else:
        texts = [t["text"] if isinstance(t, dict) and "text" in t else t for t in corpus]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError("the corpus for key statistics holds no non-empty text")
    if n_texts is not None:
        # a fixed, seeded spread over the corpus
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(texts), generator=g)[:n_texts].sort().values.tolist()
        texts = [texts[i] for i in idx]
    return texts


def _corpus_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True, repr=False, eq=False)
class KeyStatistics(ValueEquality):
    """``C = E[k k^T]`` of the keys at one layer, with how it was computed."""

    layer: int
    moment: Float[Tensor, "d_mlp d_mlp"]  # float64
    count: int  # tokens averaged
    model_fingerprint: str
    corpus_hash: str
    n_texts: int
    # the corpus' name and size when known: a description, left out of ==, which compares the numbers and
    # the hashes of the model and the texts
    corpus: str = field(default="", compare=False)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of these statistics (layer, provenance and the matrix itself), computed once: what
        AlphaEdit's projector cache is keyed by, so that other statistics of the same layer never reuse
        a projector."""
        h = hashlib.sha256(json.dumps([self.layer, self.count, self.model_fingerprint, self.corpus_hash,
                                       self.n_texts, list(self.moment.shape), str(self.moment.dtype)]).encode())
        h.update(self.moment.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:  # a summary; the matrix is in .moment
        corpus = f" ({self.corpus})" if self.corpus else ""
        return (f"KeyStatistics(layer {self.layer}, [{self.moment.shape[0]} x {self.moment.shape[1]}] "
                f"from {self.count} keys of {self.n_texts} texts{corpus}, model {self.model_fingerprint[:12]})")

    @classmethod
    def compute(cls, model: Model, layer: int, corpus: Any = None, *, n_texts: int | None = 10_000,
                batch_size: int = 64, cache: bool = True, progress: bool = True,
                directory: str | Path | None = None, prepend_bos: bool | None = None,
                precision: str = "mixed") -> KeyStatistics:
        """Compute (or load from the disk cache) the key statistics of ``layer``.

        Under torch.distributed, batch ``b`` of ``batch_size`` texts is run by rank ``b % world_size`` and
        the float64 sums are all-reduced: every rank gets the one-process moment (to float64 rounding).

        Args:
            corpus: texts: a list of strings (or of dicts with ``text``), a ``datasets.Dataset`` with a
                ``text`` column, a text file (one text per line; ``.jsonl``: a ``text`` field per line), or
                a stream (``datasets.load_dataset(..., streaming=True)``, a generator), of which the
                first ``n_texts`` are read; default (:func:`model_corpus`): the embedded model's training text
                on the embedded model, 11,200 Wikipedia sentences (FewRel's) on every other model; its
                name is in :attr:`corpus`.
            n_texts: use at most this many texts (a seeded sample; a stream's first); ``None`` for all.
            cache: read and write the disk cache (``directory`` or :func:`cache_dir`; only rank 0 writes).
            prepend_bos: ``None`` follows the model; ``False`` tokenises as ROME's ``layer_stats`` does on
                GPT-2 (no BOS, every token counted). A prepended BOS's key is never counted (it is the
                same for every text).
            precision: ``"mixed"`` (default): each batch's ``k^T k`` in float32, summed over batches in
                float64 (ROME's ``layer_stats`` keeps all of it in float32); ``"float64"``: the products in
                float64 too, about 2x slower, exact to float64 rounding.
        """
        if not 0 <= layer < model.cfg.n_layers:
            raise EditError(f"layer {layer} is out of range for a model with {model.cfg.n_layers} layers")
        if precision not in ("mixed", "float64"):
            raise EditError(f"precision {precision!r} is not 'mixed' or 'float64'")
        if corpus is None:
            corpus, name = model_corpus(model)
        else:
            name = str(corpus) if isinstance(corpus, (str, Path)) else "given by the caller"
        texts = _texts(corpus, n_texts)
        name = f"{name}: {len(texts)} texts"
        fp, ch = model_fingerprint(model, layer), _corpus_hash(texts)
        path = Path(directory) if directory else cache_dir()
        bos = model.cfg.default_prepend_bos if prepend_bos is None else bool(prepend_bos)
        file = path / (f"{fp}_L{layer}_{ch}_{len(texts)}{'' if bos else '_nobos'}"
                       f"{'' if precision == 'mixed' else '_f64'}.safetensors")
        if cache and file.is_file():
            data = load_file(file)
            logger.info("loaded key statistics from %s", file)
            return cls(layer, data["moment"], int(data["count"].item()), fp, ch, len(texts), name)
        r = ranks()
        tokens = tokenize_corpus(model, texts, bos)
        order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))  # similar lengths together: little padding
        batches = [[tokens[i] for i in order[b:b + batch_size]] for b in range(0, len(order), batch_size)]
        mine = [batches[b] for b in r.share(len(batches))]  # batch b goes to rank b % world_size
        with model_lock(model):
            total, count = _accumulate(model, layer, mine, progress and r.is_main, bos, precision)
        total = all_reduce_sum(total, r)
        count = int(all_reduce_sum(torch.tensor([count], dtype=torch.float64), r).item())
        if count == 0:
            raise DataError("the corpus gave no tokens to accumulate key statistics over")
        moment = total / count
        stats = cls(layer, moment, count, fp, ch, len(texts), name)
        if cache and r.is_main:
            _atomic_save({"moment": moment.contiguous(), "count": torch.tensor([count])}, file)
        return stats

    def save(self, path: str | Path, *, corpus: str = "") -> Path:
        """Write these statistics to one safetensors file to share (the moment in float64 and, in its
        header as JSON, the format, layer, key count, model fingerprint, corpus hash, number of
        texts and ``corpus``, a description of the corpus, by default :attr:`corpus`). :meth:`load` reads it back equal."""
        meta = {"format": STATS_FORMAT, "layer": self.layer, "count": self.count, "model_fingerprint": self.model_fingerprint,
                "corpus_hash": self.corpus_hash, "n_texts": self.n_texts, "corpus": corpus or self.corpus,
                "d_mlp": int(self.moment.shape[0])}
        file = Path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({"moment": self.moment.contiguous()}, str(file), metadata={"relation_lens": json.dumps(meta)})
        return file

    @classmethod
    def load(cls, path: str | Path, model: Model | None = None) -> KeyStatistics:
        """Statistics written by :meth:`save`. With ``model``, they are refused (:class:`EditError`)
        unless they were computed on its weights (the fingerprint of the weights up to their layer)."""
        meta = read_statistics_header(path)
        stats = cls(int(meta["layer"]), load_file(str(path))["moment"], int(meta["count"]), meta["model_fingerprint"],
                    meta["corpus_hash"], int(meta["n_texts"]), str(meta.get("corpus", "")))
        if model is not None:
            if not 0 <= stats.layer < model.cfg.n_layers:
                raise EditError(f"{path}: key statistics of layer {stats.layer}; the model has {model.cfg.n_layers}")
            fp = model_fingerprint(model, stats.layer)
            if fp != stats.model_fingerprint:
                raise EditError(f"{path}: key statistics computed on other weights (fingerprint "
                                f"{stats.model_fingerprint}, this model's {fp} up to layer {stats.layer})")
        return stats

    def inverse_times(self, k: Float[Tensor, d_mlp], ridge: float = 0.0) -> Float[Tensor, d_mlp]:
        """``C^-1 k`` (float64 solve), with ``ridge x mean(diag C)`` added to the diagonal."""
        C = self.moment
        if ridge:
            C = C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
        return torch.linalg.solve(C, k.to(C.dtype).cpu())


STATS_FORMAT = "relation_lens.key_statistics/1"


def read_statistics_header(path: str | Path) -> dict:
    """The metadata of a key-statistics file (:meth:`KeyStatistics.save`), without the matrix."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"no key-statistics file at {file}")
    try:
        with safe_open(str(file), framework="pt") as f:
            raw = (f.metadata() or {}).get("relation_lens")
    except Exception as exc:  # not a safetensors file
        raise DataError(f"{file} is not a safetensors file ({type(exc).__name__})") from None
    meta = json.loads(raw) if raw else {}
    if meta.get("format") != STATS_FORMAT:
        raise DataError(f"{file} is not a relation_lens key-statistics file (format {meta.get('format')!r})")
    return meta


def _atomic_save(tensors: dict[str, Tensor], file: Path) -> None:
    """Write ``tensors`` to ``file`` through a temporary file of a unique name in the same folder and
    an atomic rename, so that concurrent runs never read a half-written file nor clobber each
    other's temporary file (the last rename wins; both wrote the same numbers)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tokenize_corpus(model: Model, texts: Sequence[str], bos: bool) -> list[Tensor]:
    """Each text's tokens as ``model.to_tokens(text, prepend_bos=bos, truncate=True)`` gives them, in
    one batched tokenizer call (a call per text costs more than the forward passes on a small model)."""
    tok = tokenizer_of(model)
    limit = model.cfg.n_ctx
    if not getattr(tok, "is_fast", False) or tok.bos_token_id is None:
        return [model.to_tokens(t, prepend_bos=bos, truncate=True)[0].cpu() for t in texts]
    head = [tok.bos_token_id] if bos else []
    out = []
    for i in range(0, len(texts), 1024):
        for ids in tok(list(texts[i:i + 1024]), add_special_tokens=False)["input_ids"]:
            out.append(torch.tensor((head + ids)[:limit], dtype=torch.long))
    return out


class _StopForward(Exception):
    """Raised by the key hook: nothing after ``hook_post`` of the layer is needed."""


@torch.no_grad()
def _accumulate(model: Model, layer: int, batches: list[list[Tensor]], progress: bool, bos: bool,
                precision: str = "mixed") -> tuple[Tensor, int]:
    """The float64 sum of ``k k^T`` and the number of keys over ``batches`` of token sequences. The
    forward stops at the key (``hook_post`` of the layer): the rest of the block and of the model is
    not run, as ROME's ``layer_stats`` stops its trace."""
    name = f"blocks.{layer}.mlp.hook_post"
    d = model.cfg.d_mlp
    if d is None:
        raise UnsupportedModelError(f"the model {model.cfg.model_name!r} has no MLPs (d_mlp is None): no keys to count")
    moment = torch.zeros(d, d, dtype=torch.float64)
    count = 0
    stored = {}

    def grab(act, hook):
        stored["k"] = act.detach()
        raise _StopForward

    for ids in tqdm(batches, desc=f"key statistics L{layer}", disable=not progress):
        batch = right_pad(model, ids)
        mask = torch.zeros(batch.shape, dtype=torch.bool)
        for r, x in enumerate(ids):
            mask[r, :len(x)] = True
        if bos:
            mask[:, 0] = False  # the BOS state is the same for every text
        # right padding under causal attention leaves real tokens untouched
        with model.hooks(fwd_hooks=[(name, grab)]):
            try:
                run_blocks(model, embed(model, batch.to(model.cfg.device)), 0, layer + 1)
            except _StopForward:
                pass
        k = stored.pop("k")
        k = k[mask.to(k.device)]  # the edited layer's device (blocks may be split over devices)
        if precision == "float64":
            k = k.double().cpu()
            moment.addmm_(k.T, k)
        else:
            k = k.float()
            moment += (k.T @ k).cpu().double()
        count += k.shape[0]
    return moment, count
