"""Per-clip scores for ranking generations (the post-training pair builder) and for the CL / AES
columns of the evaluation.

```python
scorer = load_scorer("clap", "/models/clap-htsat-fused")
scorer.score(waves, 16000, texts=prompts)          # {"clap": float64 [n]}
load_scorer("aesthetics", "/models/audiobox-aesthetics/checkpoint.pt").score(waves, 16000)
# {"aes_ce", "aes_cu", "aes_pc", "aes_pq", "aes": float64 [n]}
load_scorer("my_pkg.scoring:MyScorer", "/models/mine")  # a Scorer subclass, MyScorer(path, device=...)
```

Higher is better for every metric a scorer returns. Each scorer resamples its input itself.
"""

from __future__ import annotations

import abc
from typing import Optional, Sequence

import numpy as np

from megatron_ualm.evaluation import metrics
from megatron_ualm.plugins import plugin_class


class Scorer(abc.ABC):
    """Scores clips one by one.

    Attributes:
        name: ``clap``, ``aesthetics`` or a plug-in's name.
        sample_rate: the rate the backbone reads (``score`` resamples to it).
        needs_text: ``score`` compares the audio with ``texts`` (the prompts).
    """

    name: str = ""
    sample_rate: int = 16000
    needs_text: bool = False

    @abc.abstractmethod
    def score(self, waves: Sequence[np.ndarray], sample_rate: int,
              texts: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
        """Per-clip scores.

        Args:
            waves: mono float clips.
            sample_rate: their rate.
            texts: one prompt per clip (required when ``needs_text``).

        Returns:
            ``{metric: float64 [n]}``, higher is better for each.
        """

    def _check(self, waves, texts) -> None:
        if self.needs_text and (texts is None or len(texts) != len(waves)):
            raise ValueError(f"the {self.name} scorer compares audio with text: give one text per clip "
                             f"({len(waves)} clips, {0 if texts is None else len(texts)} texts)")


class ClapScorer(Scorer):
    """LAION-CLAP cosine similarity of each clip with its prompt (``{"clap"}``).

    Args:
        path: a ``transformers`` CLAP folder (see ``backbones.CLAP``).
        device: torch device.
    """

    name, needs_text = "clap", True

    def __init__(self, path: str, device: Optional[str] = None) -> None:
        from megatron_ualm.evaluation.backbones import CLAP

        self.backbone = CLAP(path, device=device)
        self.sample_rate = self.backbone.sample_rate

    def score(self, waves, sample_rate, texts=None):
        self._check(waves, texts)
        if not len(waves):
            return {"clap": np.zeros(0)}
        audio = np.stack([f["clap_audio"] for f in self.backbone.features(waves, sample_rate)])
        return {"clap": metrics.clap_score(audio, self.backbone.text_embeddings(texts))}


class AestheticsScorer(Scorer):
    """AudioBox-Aesthetics CE / CU / PC / PQ and their mean ``aes`` per clip.

    Args:
        path: the aesthetics ``checkpoint.pt`` or a folder holding it.
        device: torch device.
    """

    name = "aesthetics"

    def __init__(self, path: str, device: Optional[str] = None) -> None:
        from megatron_ualm.evaluation.backbones import Aesthetics

        self.backbone = Aesthetics(path, device=device)
        self.sample_rate = self.backbone.sample_rate

    def score(self, waves, sample_rate, texts=None):
        keys = self.backbone.outputs
        rows = self.backbone.features(waves, sample_rate)
        out = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in keys}
        out["aes"] = np.mean([out[k] for k in keys], axis=0) if rows else np.zeros(0)
        return out


SCORERS = {"clap": ClapScorer, "aesthetics": AestheticsScorer}


def load_scorer(spec: str, path: str, device: Optional[str] = None) -> Scorer:
    """Builds a scorer.

    Args:
        spec: ``clap``, ``aesthetics``, or ``package.module:ClassName`` of a ``Scorer`` subclass
            (constructed as ``ClassName(path, device=device)``).
        path: the scorer's local weights.
        device: torch device (default: GPU if there is one).

    Returns:
        The scorer.
    """
    if spec in SCORERS:
        return SCORERS[spec](path, device=device)
    if ":" not in spec:
        raise ValueError(f"scorer {spec!r} is not one of {sorted(SCORERS)} nor package.module:ClassName")
    cls = plugin_class(spec, "scorer", Scorer)
    return cls(path, device=device)
