"""Worked example (docs/extending.md): an evaluator, the mean L2 norm of each head's feature.

    IMPORTS: [docs/examples/feature_norm_evaluator.py]
    TEST:
      EVALUATORS: [reid, feature_norm]
"""
from typing import Dict, Optional

import torch

from engine.evaluator import EVALUATOR_REGISTRY, DatasetEvaluator, gather


@EVALUATOR_REGISTRY.register("feature_norm")
class FeatureNormEvaluator(DatasetEvaluator):
    """Reports ``norm/<head>``: the mean L2 norm of the head's pre-BN feature over the set."""

    @classmethod
    def from_config(cls, cfg, eval_set) -> "FeatureNormEvaluator":  # noqa: ARG003
        return cls()

    def reset(self) -> None:
        self._sums: Dict[str, torch.Tensor] = {}  # head -> (norm sum, count), this rank's shard

    def process(self, batch: Dict, outputs: Dict, flipped: Optional[Dict] = None) -> None:
        for name, head in outputs["heads"].items():
            norms = head.feat.detach().float().norm(dim=1).cpu().double()
            total = self._sums.setdefault(name, torch.zeros(2, dtype=torch.float64))
            total += torch.stack([norms.sum(), torch.tensor(float(norms.numel()), dtype=torch.float64)])

    def evaluate(self) -> Dict:
        results = {}
        for name in sorted(self._sums):
            norm_sum, count = gather(self._sums[name].unsqueeze(0)).sum(0).tolist()
            results[f"norm/{name}"] = norm_sum / count
        return results
