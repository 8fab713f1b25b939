"""One frozen config for every tracing entry point: :func:`~relation_lens.trace`,
:func:`~relation_lens.trace_dataset`, the CLI and the experiments.

Settings are algorithm settings only (the prompt, subject and target are data, passed apart);
every caller gets the same defaults, stated here once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from relation_lens.errors import ConfigError, NoiseError, SpanError
from relation_lens.results import ValueEquality

Kind = Literal["resid", "mlp", "attn"]
KINDS: tuple[Kind, ...] = ("resid", "mlp", "attn")
HOOKS = {"resid": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out", "attn": "blocks.{}.hook_attn_out"}
NOISE_MULTIPLIER = 3.0
NOISE_RULES = ("embedding", "rome")


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layers restored around ``layer`` for windowed kinds, centred and clipped as ROME does.

    >>> list(window_layers(0, 10, 48)), list(window_layers(20, 10, 48))[:2], list(window_layers(5, 1, 6))
    ([0, 1, 2, 3, 4], [15, 16], [5])
    """
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def depth_scaled_window(n_layers: int) -> int:
    """ROME's window (10 layers of GPT-2 XL's 48) as the same fraction of another model's depth:
    10 for 48 layers, 2 for 12, 1 for the 6-layer default model. The default of every caller."""
    return max(1, round(10 * n_layers / 48))


CORRUPTIONS = ("noise", "replace")
METRICS = ("prob", "logprob", "logit_diff")
METHODS = ("exact", "attribution")


@dataclass(frozen=True, eq=False)
class TraceConfig(ValueEquality):
    """How to trace.

    Attributes:
        corrupt: ``"relation"`` (relation tracing), ``"subject"`` (ROME's causal tracing) or an
            explicit half-open token span ``(start, end)``.
        kinds: sites to restore, some of ``"resid"``, ``"mlp"``, ``"attn"`` (one kind may be given
            as a string).
        window: layers restored together for ``"mlp"``/``"attn"`` (centred, clipped at the ends);
            ``None`` (default) is :func:`depth_scaled_window`: ROME's 10 of 48 layers, scaled.
        n_samples: noise draws; scores are averaged over them.
        noise: the Gaussian noise: ``None`` or ``"embedding"`` for 3 x the std of the whole token
            embedding matrix; ``"rome"`` for ROME's rule, 3 x the std of the embeddings of subject
            tokens over a list of subjects (``noise_subjects``; by default the default model's world
            subjects on that model, known_1000's elsewhere); a number for the std itself; or the
            exact noise as a ``[n_samples, span_len, d_model]`` tensor.
        noise_subjects: the subject list for ``noise="rome"`` (``None``: see above).
        seed: seed of the noise generator.
        include_last: whether the relation span includes the prompt's last token.
        batch_size: most rows (sites x noise samples) in one patched batch; bounds memory.
        prepend_bos: ``None`` follows the model (``model.cfg.default_prepend_bos``: the default
            model was trained with BOS); ``False`` tokenises as ROME's code does on GPT-2.
        corrupt_with: ``"noise"`` (Gaussian noise on the span's embeddings, ROME) or ``"replace"``
            (symmetric token replacement, Zhang & Nanda 2023: the span takes the tokens of a
            counterfactual prompt of the same token length; deterministic, one run per site, so
            ``n_samples`` is not used).
        metric: what a site's score measures at the last position: ``"prob"`` (P(target), ROME),
            ``"logprob"`` (log P(target)) or ``"logit_diff"`` (logit of the target minus that of a
            contrast token: the counterfactual's answer under ``"replace"``, or one given to
            :func:`trace`); or a function of the final-position logits: ``metric(logits)`` or
            ``metric(logits, targets)``, ``logits`` ``[rows, d_vocab]`` (float32 or wider, one row per
            patched run), ``targets`` ``[rows]`` (each row's target token), returning ``[rows]`` floats
            (e.g. the probability mass on a set of tokens). Attribution patching differentiates it, so
            there it must be made of differentiable torch operations (checked). Results record a
            function by its ``module.qualname``.
        method: ``"exact"`` (the patching engine) or ``"attribution"`` (attribution patching: the
            first-order approximation of every score from one corrupted forward and one backward
            pass; :mod:`relation_lens.tracing.attribution`).
    """

    corrupt: str | Sequence[int] = "relation"
    kinds: str | Sequence[str] = KINDS
    window: int | None = None
    n_samples: int = 10
    noise: float | str | Tensor | None = None
    noise_subjects: Sequence[str] | None = None
    seed: int = 0
    include_last: bool = True
    batch_size: int = 512
    prepend_bos: bool | None = None
    corrupt_with: str = "noise"
    metric: str | Callable[..., Any] = "prob"
    method: str = "exact"

    def __post_init__(self):
        kinds = (self.kinds,) if isinstance(self.kinds, str) else self.kinds
        if not isinstance(kinds, Sequence) or not kinds:
            raise ConfigError(f"kinds {self.kinds!r} is empty; choose some of {list(KINDS)}")
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ConfigError(f"unknown kind(s) {bad} in kinds={self.kinds!r}; choose from {list(KINDS)}")
        object.__setattr__(self, "kinds", tuple(dict.fromkeys(kinds)))
        if self.window is not None and (not _is_int(self.window) or self.window < 1):
            raise ConfigError(f"window must be a positive int (or None for the depth-scaled default), "
                              f"got {self.window!r}")
        if not _is_int(self.n_samples) or self.n_samples < 1:
            raise NoiseError(f"n_samples must be a positive int, got {self.n_samples!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if not _is_int(self.seed):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")
        if self.corrupt_with not in CORRUPTIONS:
            raise ConfigError(f"corrupt_with={self.corrupt_with!r} is not one of {list(CORRUPTIONS)}")
        if not callable(self.metric) and self.metric not in METRICS:
            raise ConfigError(f"metric={self.metric!r} is not one of {list(METRICS)} or a function of the "
                              "final-position logits ([rows, d_vocab] -> [rows])")
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not one of {list(METHODS)}")
        if isinstance(self.noise, str) and self.noise not in NOISE_RULES:
            raise NoiseError(f"noise={self.noise!r} is not one of {list(NOISE_RULES)}, a number or a tensor")
        if isinstance(self.noise, bool):
            raise NoiseError(f"noise={self.noise!r} is a bool, not a std, a rule {list(NOISE_RULES)} or a tensor")
        if not isinstance(self.include_last, bool):
            raise ConfigError(f"include_last must be True or False, got {self.include_last!r}")
        if self.noise is not None and not isinstance(self.noise, (str, Tensor)):
            try:
                std = float(self.noise)
            except (TypeError, ValueError):
                raise NoiseError(f"noise {self.noise!r} is not a number, a rule {list(NOISE_RULES)} or a tensor") from None
            if not math.isfinite(std) or std < 0:
                raise NoiseError(f"noise std must be a finite number >= 0, got {self.noise!r}")
        if self.noise_subjects is not None:
            subjects = (self.noise_subjects,) if isinstance(self.noise_subjects, str) else tuple(self.noise_subjects)
            if not subjects or not all(isinstance(s, str) and s.strip() for s in subjects):
                raise NoiseError("noise_subjects must be a non-empty list of non-empty strings")
            object.__setattr__(self, "noise_subjects", subjects)
        if isinstance(self.corrupt, str):
            if self.corrupt not in ("relation", "subject"):
                raise SpanError(f"corrupt={self.corrupt!r} is not 'relation', 'subject' or a (start, end) token span")
        else:
            try:
                a, b = (int(v) for v in self.corrupt)
            except (TypeError, ValueError):
                raise SpanError(f"corrupt={self.corrupt!r} is not 'relation', 'subject' or a (start, end) "
                                "token span") from None
            object.__setattr__(self, "corrupt", (a, b))
        if self.prepend_bos is not None and not isinstance(self.prepend_bos, bool):
            raise ConfigError(f"prepend_bos must be None, True or False, got {self.prepend_bos!r}")

    def window_for(self, n_layers: int) -> int:
        """The window in layers on a model of ``n_layers``."""
        return depth_scaled_window(n_layers) if self.window is None else self.window

    def replace(self, **changes: Any) -> TraceConfig:
        """A copy with ``changes``; unknown names raise :class:`~relation_lens.errors.ConfigError`."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown tracing setting(s) {unknown}; TraceConfig has "
                              f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, config: TraceConfig | None, settings: dict[str, Any]) -> TraceConfig:
        """``config`` (or the defaults) with the keyword ``settings`` of a call on top."""
        if config is not None and not isinstance(config, TraceConfig):
            raise ConfigError(f"config must be a TraceConfig, got {type(config).__name__}")
        return (config or cls()).replace(**settings) if settings else (config or cls())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (a noise tensor is recorded by its shape only)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["metric"] = metric_name(self.metric)
        if isinstance(self.noise, Tensor):
            d["noise"] = f"tensor{list(self.noise.shape)}"
        d["kinds"] = list(self.kinds)
        if isinstance(self.corrupt, tuple):
            d["corrupt"] = list(self.corrupt)
        if self.noise_subjects is not None:
            d["noise_subjects"] = list(self.noise_subjects)
        return d


def metric_name(metric: str | Callable[..., Any]) -> str:
    """How results and checkpoints record a metric: its name, or a function's ``module.qualname``
    (stable across runs, so that a resumed run with the same function matches)."""
    if isinstance(metric, str):
        return metric
    return f"{getattr(metric, '__module__', None) or '?'}.{getattr(metric, '__qualname__', type(metric).__name__)}"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
