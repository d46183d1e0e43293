import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union, overload

PathLike = Union[str, os.PathLike[str]]

__version__: str

class Error(Exception):
    """Base class of every error weightdiff raises; the message is the command line's."""

class ModelError(Error):
    """A model cannot be read: missing, malformed, or an unresolvable hub id."""

class OptionError(Error):
    """An argument is unusable (bad regex, threshold out of range, …)."""

class Comparison:
    """The result of comparing a base with one fine-tuned model."""

    @property
    def document(self) -> Dict[str, Any]: ...
    @property
    def lora_analysis(self) -> Optional[Dict[str, Any]]: ...
    def columns(self) -> Dict[str, List[Any]]: ...
    def to_pandas(self) -> Any: ...
    def to_arrow(self) -> Any: ...
    def to_polars(self) -> Any: ...
    @property
    def verdict(self) -> Optional[Dict[str, Any]]: ...
    @property
    def lora(self) -> Dict[str, Dict[str, Any]]: ...
    @property
    def status(self) -> str: ...
    @property
    def complete(self) -> bool: ...
    @property
    def base(self) -> str: ...
    @property
    def finetuned(self) -> str: ...
    @property
    def modified(self) -> List[str]: ...
    @property
    def errors(self) -> Dict[str, str]: ...
    def save(self, directory: PathLike, *, top: int = 20) -> List[Path]: ...
    def html(self, *, top: int = 20) -> str: ...
    def _repr_html_(self) -> str: ...

class Adapter:
    """The PEFT adapter directory written by extract_lora."""

    path: Path
    status: str
    summary: Dict[str, Any]
    files: List[Path]
    errors: Dict[str, str]
    metadata: Dict[str, Any]
    @property
    def verdict(self) -> Optional[Dict[str, Any]]: ...
    def __fspath__(self) -> str: ...

class Inspection:
    """A model's tensors and facts, from its headers alone."""

    structure: Dict[str, Any]
    tensors: List[Dict[str, Any]]
    problems: List[str]
    broken: bool
    def to_pandas(self) -> Any: ...

@overload
def compare(
    base: PathLike,
    finetuned: PathLike,
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
) -> Comparison: ...
@overload
def compare(
    base: PathLike,
    finetuned: Union[List[PathLike], tuple[PathLike, ...]],
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
) -> List[Comparison]: ...
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
) -> Adapter: ...
def inspect(model: PathLike, *, progress: bool = True) -> Inspection: ...
