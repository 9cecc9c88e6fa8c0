"""Training-free baseline coders (METHODS.md, "Baselines and ceilings"), all built on faiss.

Binary codes, searched by symmetric Hamming distance (`encoders.metrics.hamming_scores`):
- `lsh`    centre on the train mean, random orthogonal projection to `bits` dims, sign.
- `pca-rr` PCA to `bits` dims, random rotation, sign.
- `itq`    faiss ITQTransform: centre, L2-normalise, PCA to `bits` dims, ITQ rotation, sign.

Vector-quantisation codes, searched by asymmetric distance (ADC: float query vs stored code):
- `pq`     faiss ProductQuantizer, M = bits / 8 sub-quantizers of 256 centroids (8 bits each).
- `opq`    faiss OPQMatrix rotation, then the same PQ.
- `float`  the raw float32 features as bytes (the accuracy ceiling).

Similarity for `pq`, `opq` and `float` is minus the squared L2 distance on the features as given;
callers who want cosine similarity L2-normalise the features before `fit`/`encode`/`scores`.
`pq`/`opq` scores are exact ADC: -sum_m T[q, m, code_m] with T the per-sub-space squared distance
tables of `ProductQuantizer.compute_distance_tables` (computed here in float64, see
`_AdcCoder.distance_tables`), i.e. -||q' - decode(code)||² where q' is the query in the quantizer's
space (after the OPQ rotation / zero padding).

Binary layout: bit j of a code is `projection_j > 0`, stored in byte j // 8 at bit j % 8 (LSB first),
the layout of `faiss.IndexLSH` and `faiss.IndexBinaryFlat`.

Every config requires `bits` to be a positive multiple of 8 (the shortest length in the reports is 8).
`state()` holds faiss objects serialised to uint8 torch tensors, so `torch.save` +
`torch.load(weights_only=True)` round-trips it (numpy arrays are refused by weights_only loading).

The families live in `encoders/sign_coders.py`, `encoders/pq_coders.py` and
`encoders/float_coder.py` (shared mechanics: `encoders/faiss_codes.py`); this module gathers them.
"""
from __future__ import annotations

# Importing the family modules registers their coders (encoders.coders.register).
from encoders.faiss_codes import adc_scores, pack_signs
from encoders.float_coder import FloatCoder, FloatConfig
from encoders.metrics import hamming_scores
from encoders.pq_coders import OpqCoder, OpqConfig, PqCoder, PqConfig
from encoders.sign_coders import ItqCoder, ItqConfig, LshCoder, LshConfig, PcaRrCoder, PcaRrConfig

__all__ = [
    "LshConfig", "PcaRrConfig", "ItqConfig", "PqConfig", "OpqConfig", "FloatConfig",
    "LshCoder", "PcaRrCoder", "ItqCoder", "PqCoder", "OpqCoder", "FloatCoder",
    "pack_signs", "adc_scores", "hamming_scores",
]
