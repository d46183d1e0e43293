"""weightdiff: compare a base checkpoint with a fine-tuned one, tensor by tensor.

The same library as the ``weightdiff`` command, from Python::

    import weightdiff

    c = weightdiff.compare("Qwen/Qwen3-0.6B", "./my-finetune")
    df = c.to_pandas()               # one row per tensor
    print(c.verdict)                 # merged LoRA? rank? which modules?
    print(df.nlargest(5, "relative_diff")[["name", "relative_diff"]])
    c.save("out")                    # the report files of `weightdiff compare`

Models are given as on the command line: a Hugging Face directory, a ``.safetensors``
or ``pytorch_model.bin`` file, or a hub id resolved through the Hugging Face cache.
Jobs run without the GIL; Ctrl-C (``KeyboardInterrupt``) stops them within a second;
progress is shown with tqdm when it is installed; the lines the command prints go to
the ``weightdiff`` logger. Every error is a :class:`weightdiff.Error` carrying the
command line's message.
"""

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from . import _native
from ._native import Error, ModelError, OptionError
from ._progress import Reporter

__version__: str = _native.__version__

__all__ = [
    "Adapter",
    "Comparison",
    "Error",
    "Inspection",
    "ModelError",
    "OptionError",
    "compare",
    "extract_lora",
    "inspect",
    "__version__",
]

PathLike = Union[str, "os.PathLike[str]"]


def _path(p: PathLike) -> str:
    return os.fspath(p)


class Comparison:
    """The result of comparing a base with one fine-tuned model.

    The per-tensor metrics are those of ``weight_differences.json`` (SPEC §3), as a
    DataFrame with :meth:`to_pandas`, :meth:`to_arrow` or :meth:`to_polars`.
    """

    def __init__(self, native: "_native.NativeComparison") -> None:
        self._native = native
        self._document: Optional[Dict[str, Any]] = None
        self._analysis: Optional[Dict[str, Any]] = None
        self._analysed = False

    # The documents, rendered by the Rust library on first use.
    @property
    def document(self) -> Dict[str, Any]:
        """``weight_differences.json`` as a dict (metrics, errors, mismatches, timings)."""
        if self._document is None:
            self._document = self._native.document()
        return self._document

    @property
    def lora_analysis(self) -> Optional[Dict[str, Any]]:
        """``lora_analysis.json`` as a dict; ``None`` when the low-rank stage did not run."""
        if not self._analysed:
            self._analysis = self._native.lora_analysis()
            self._analysed = True
        return self._analysis

    def columns(self) -> Dict[str, List[Any]]:
        """The DataFrame's columns: ``name``, ``module_type``, ``layer_index``, then every
        per-tensor key of ``weight_differences.json``, one list entry per tensor."""
        return self._native.columns()

    def to_pandas(self) -> "Any":
        """The per-tensor metrics as a ``pandas.DataFrame``, one row per compared tensor."""
        import pandas

        return pandas.DataFrame(self.columns())

    def to_arrow(self) -> "Any":
        """The per-tensor metrics as a ``pyarrow.Table`` (needs pyarrow)."""
        import pyarrow

        return pyarrow.table(self.columns())

    def to_polars(self) -> "Any":
        """The per-tensor metrics as a ``polars.DataFrame`` (needs polars)."""
        import polars

        return polars.DataFrame(self.columns(), strict=False)

    @property
    def verdict(self) -> Optional[Dict[str, Any]]:
        """What the fine-tune is: ``kind`` (``merged_lora``, ``full_finetune``,
        ``unchanged``, ``mixed``, or why the models are not a base and a derivative),
        ``rank``, ``target_modules``, ``confidence``: the ``--json`` summary's verdict.
        ``None`` when the low-rank stage did not run (``lora=False``)."""
        return self._native.verdict()

    @property
    def lora(self) -> Dict[str, Dict[str, Any]]:
        """Per modified matrix, its spectrum: ``singular_values``, ``energy``,
        ``effective_rank_90``/``_99``, ``stable_rank``, ``detected_rank``, … (the
        ``tensors`` of ``lora_analysis.json``); empty without the low-rank stage."""
        a = self.lora_analysis
        return {} if a is None else a["tensors"]

    @property
    def status(self) -> str:
        """``ok``, ``tensor_errors`` or ``not_a_derivative`` (the command's exit status
        0, 1 or 3)."""
        return self._native.status()

    @property
    def complete(self) -> bool:
        return bool(self.document["complete"])

    @property
    def base(self) -> str:
        return self.document["base"]

    @property
    def finetuned(self) -> str:
        return self.document["finetuned"]

    @property
    def modified(self) -> List[str]:
        """Names of the tensors with at least one element changed beyond the threshold."""
        return list(self.document["modified_layers"])

    @property
    def errors(self) -> Dict[str, str]:
        """Tensors that could not be compared, with the reason."""
        return dict(self.document["errors"])

    def save(self, directory: PathLike, *, top: int = 20) -> List[Path]:
        """Writes the report files of ``weightdiff compare`` into ``directory``
        (``weight_differences.json``, ``report.html``, the adapter, …); returns their paths."""
        return [Path(p) for p in self._native.save(_path(directory), top)]

    def html(self, *, top: int = 20) -> str:
        """``report.html``: the self-contained page of the command line."""
        return self._native.html(top)

    def _repr_html_(self) -> str:
        from ._html import comparison_html

        return comparison_html(self)

    def __repr__(self) -> str:
        v = self.verdict or {}
        return (
            f"<weightdiff.Comparison {self.base!r} -> {self.finetuned!r}: "
            f"{len(self.document['all_differences'])} tensors, {len(self.modified)} modified, "
            f"verdict {v.get('kind')!r}>"
        )


class Adapter:
    """The PEFT adapter directory written by :func:`extract_lora`."""

    def __init__(self, path: Path, raw: Dict[str, Any]) -> None:
        self.path = path
        self.status: str = raw["status"]
        self.summary: Dict[str, Any] = raw["summary"] or {}
        self.files: List[Path] = [Path(p) for p in raw["written"]]
        self.errors: Dict[str, str] = raw["errors"]
        meta = path / "lora_metadata.json"
        #: ``lora_metadata.json``: the parameters, per module the rank and the error.
        self.metadata: Dict[str, Any] = {}
        if meta.is_file():
            import json

            self.metadata = json.loads(meta.read_text())

    @property
    def verdict(self) -> Optional[Dict[str, Any]]:
        return self.summary.get("verdict")

    def __repr__(self) -> str:
        return (
            f"<weightdiff.Adapter {str(self.path)!r}: {self.summary.get('modules')} modules, "
            f"default rank {self.summary.get('default_rank')}>"
        )

    def __fspath__(self) -> str:
        return str(self.path)


class Inspection:
    """A model's tensors and facts, from its headers alone (``weightdiff inspect``)."""

    def __init__(self, raw: Dict[str, Any]) -> None:
        #: parameter count, bytes, dtype histogram, model_type, module counts
        self.structure: Dict[str, Any] = raw["structure"]
        #: one dict per tensor: name, dtype, shape, …
        self.tensors: List[Dict[str, Any]] = raw["tensors"]
        self.problems: List[str] = raw["problems"]
        #: some tensors cannot be read
        self.broken: bool = raw["broken"]
        self._text: str = raw["text"]

    def to_pandas(self) -> "Any":
        import pandas

        return pandas.DataFrame(self.tensors)

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return (
            f"<weightdiff.Inspection {len(self.tensors)} tensors, "
            f"{self.structure.get('parameter_count')} parameters>"
        )


def _run(progress: bool, f: Any, *args: Any, **kwargs: Any) -> Any:
    reporter = Reporter(progress)
    try:
        return f(*args, reporter=reporter, **kwargs)
    finally:
        reporter.close()


def compare(
    base: PathLike,
    finetuned: Union[PathLike, Sequence[PathLike]],
    *,
    threshold: float = 1e-6,
    lora: bool = True,
    include: Optional[str] = None,
    exclude: Optional[str] = None,
    threads: Optional[int] = None,
    progress: bool = True,
    lora_rank: Optional[int] = None,
    seed: int = 0,
    verify: bool = False,
    mmap: bool = False,
) -> Any:
    """Compares ``base`` with ``finetuned``, tensor by tensor, as ``weightdiff compare``.

    Returns a :class:`Comparison`, or a list of them when ``finetuned`` is a list or
    tuple (each compared with the same base). Nothing is written until
    :meth:`Comparison.save`.

    :param threshold: an element counts as changed when ``|finetuned - base|`` exceeds it.
    :param lora: run the low-rank analysis (merged-LoRA verdict, spectra, adapter factors).
    :param include: only tensors whose name matches this regex.
    :param exclude: skip tensors whose name matches this regex.
    :param threads: worker threads (default: all cores).
    :param progress: show tqdm bars (when tqdm is installed).
    :param lora_rank: rank of the extracted LoRA (default 16), as ``--lora-rank``.
    :param seed: seed of the randomized SVD.
    :param verify: also run the scalar f64 reference kernel and check agreement.
    :param mmap: read through memory maps.
    :raises weightdiff.Error: a model cannot be read or an option is unusable.
    """
    several = isinstance(finetuned, (list, tuple))
    fts = [_path(f) for f in finetuned] if several else [_path(finetuned)]  # type: ignore[arg-type]
    natives = _run(
        progress,
        _native.compare,
        _path(base),
        fts,
        threshold=threshold,
        lora=lora,
        include=include,
        exclude=exclude,
        threads=threads,
        lora_rank=lora_rank,
        seed=seed,
        verify=verify,
        mmap=mmap,
    )
    cs = [Comparison(n) for n in natives]
    return cs if several else cs[0]


def extract_lora(
    base: PathLike,
    finetuned: PathLike,
    out: PathLike,
    rank: int = 16,
    *,
    energy: Optional[float] = None,
    sv_ratio: Optional[float] = None,
    max_rank: Optional[int] = None,
    uniform_rank: bool = False,
    modules: Optional[Sequence[str]] = None,
    include: Optional[str] = None,
    exclude: Optional[str] = None,
    dtype: Optional[str] = None,
    skip_undecomposable: bool = False,
    task_type: Optional[str] = None,
    profile: str = "peft",
    seed: int = 0,
    threads: Optional[int] = None,
    progress: bool = True,
) -> Adapter:
    """Extracts the fine-tune's change as a PEFT LoRA adapter directory ``out``, as
    ``weightdiff extract-lora``; ``PeftModel.from_pretrained(base, out)`` loads it.

    :param rank: fixed rank per module; replaced by ``energy`` or ``sv_ratio`` when given.
    :param energy: per module, the smallest rank keeping this fraction of ‖Δ‖².
    :param sv_ratio: per module, keep singular values ≥ σ₁ / sv_ratio.
    :param modules: leaf module names to extract (default: every changed matrix).
    :param dtype: factor dtype, ``bf16``, ``f16`` or ``f32`` (default: the base's).
    :param profile: ``peft`` or ``vllm``.
    :returns: the :class:`Adapter` (its directory, files and ``lora_metadata.json``).
    :raises weightdiff.Error: unreadable models, unusable options, or models that are
        not a base and a derivative (no adapter is written then).
    """
    if energy is not None and sv_ratio is not None:
        raise OptionError("invalid option: energy and sv_ratio exclude each other")
    fixed = None if (energy is not None or sv_ratio is not None) else rank
    raw = _run(
        progress,
        _native.extract_lora,
        _path(base),
        _path(finetuned),
        _path(out),
        rank=fixed,
        energy=energy,
        sv_ratio=sv_ratio,
        max_rank=max_rank,
        uniform_rank=uniform_rank,
        modules=list(modules) if modules is not None else None,
        include=include,
        exclude=exclude,
        dtype=dtype,
        skip_undecomposable=skip_undecomposable,
        task_type=task_type,
        profile=profile,
        seed=seed,
        threads=threads,
    )
    if raw["status"] == "not_a_derivative":
        v = (raw["summary"] or {}).get("verdict") or {}
        kind = str(v.get("kind", "not a derivative")).replace("_", " ")
        raise Error(f"{kind}: {v.get('reason') or ''}; no adapter written to {_path(out)}")
    return Adapter(Path(_path(out)), raw)


def inspect(model: PathLike, *, progress: bool = True) -> Inspection:
    """A model's tensors, dtypes, shapes and parameter count, as ``weightdiff inspect``.

    :raises weightdiff.ModelError: the model cannot be read.
    """
    return Inspection(_run(progress, _native.inspect, _path(model)))
