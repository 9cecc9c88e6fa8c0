"""Deep Recurrent Quantization (DRQ): one trained model, codes of every length (METHODS.md, DRQ).

An embedding MLP maps a feature to a unit vector z (dim D). One shared codebook C (K x D) and scalars
s_1..s_{M-1} quantize z recurrently: r_0 = z; b_m = nearest codeword of s_m*C to r_m (s_0 = 1);
r_{m+1} = r_m - s_m*C[b_m]. Each level adds log2(K) bits, so the first L bits of the longest code are
the code of length L. Search is asymmetric: T = C q (one table per query serves every level) and
<q, z_hat> = sum_m s_m T[b_m]; the default score is -||q - z_hat||^2 with ||z_hat||^2 from the codes.

Choices (similarity loss and its temperature, shared with GSL and LLC; assignment; score; prefix
loss) are selected on val queries against the train gallery by bench/select_on_val.py; the candidates
and their val scores are in BENCHMARKS.md ("Selection on val") and in every coder card
(encoders/selection.py). Earlier figures measured on the query split were withdrawn.

The model and its config: `encoders/drq_model.py`; training: `encoders/drq_train.py`; this module is
the coder (lengths, encode, scores, state). Pure torch/numpy; no I/O.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch

from encoders.coders import Coder, FitReport, register
from encoders.drq_model import DRQConfig, DRQNet, make_net, pack_levels, unpack_levels
from encoders.drq_train import fit_threads, train_net
from encoders.metrics import mean_average_precision

__all__ = ["DRQCoder", "DRQConfig", "pack_levels", "unpack_levels"]

LOG = logging.getLogger(__name__)

ENCODE_BATCH = 8192        # rows per encode/embed step: memory ~ ENCODE_BATCH * (D_in + 2K) floats
LUT_QUERY_BATCH = 16       # queries per table-lookup step: keeps the accumulator block in cache
RECON_BATCH = 65536        # items reconstructed per scoring step: memory RECON_BATCH * dim floats


@register("drq")
class DRQCoder(Coder):
    """DRQ coder: `encode` gives the longest code (levels * log2(K) bits); any multiple of log2(K)
    bits up to it is a prefix (`prefix_codes`); `scores` is asymmetric (float query vs codes)."""

    method = "drq"
    symmetric = False

    def __init__(self, config: DRQConfig | None = None, *, bits: int | None = None, **overrides: Any):
        """`config` or keyword overrides of DRQConfig fields; `bits` = levels * log2(K) trains a model
        for that single length (the per-length reference the single model is compared against)."""
        cfg = replace(config or DRQConfig(), **overrides)
        if bits is not None:
            nb = cfg.bits_per_level
            if bits <= 0 or bits % nb:
                raise ValueError(f"drq: bits must be a positive multiple of log2(K)={nb}, got {bits}")
            cfg = replace(cfg, levels=bits // nb)
        self.config = cfg
        self.net: DRQNet | None = None

    # -- lengths / validation -----------------------------------------------------------------

    @property
    def lengths(self) -> tuple[int, ...]:
        nb = self.config.bits_per_level
        return tuple(nb * m for m in range(1, self.config.levels + 1))

    def _levels_for(self, bits: int | None) -> int:
        if bits is None:
            return self.config.levels
        nb = self.config.bits_per_level
        if bits % nb or not 0 < bits <= self.full_bits:
            raise ValueError(f"drq: {bits} bits is not a code length of this model; lengths are multiples "
                             f"of log2(K)={nb} up to {self.full_bits}: {self.lengths}")
        return bits // nb

    def _require_fit(self) -> DRQNet:
        if self.net is None:
            raise RuntimeError("drq: coder is not fitted; call fit() or from_state() first")
        return self.net

    def _require_shared(self) -> DRQNet:
        if self.config.codebooks != "shared":
            raise ValueError("drq: one lookup table per query needs the shared codebook (codebooks='shared')")
        return self._require_fit()

    def additive_codebooks(self, bits: int) -> tuple[np.ndarray, int, str] | None:
        """(levels, K, dim) codebooks s_m·C, log2(K) bits per level and the score ('ip' | 'l2') of the
        codes at `bits`: z_hat = sum_m s_m C[b_m]. None when the score is not additive ('cos')."""
        if self.config.score not in ("ip", "l2"):
            return None
        net, levels = self._require_fit(), self._levels_for(bits)
        with torch.no_grad():
            cbs = net.level_codebooks(levels).detach().cpu().numpy().astype(np.float32)
        return cbs, self.config.bits_per_level, self.config.score

    def query_space(self, queries: np.ndarray) -> np.ndarray:
        """Queries in the space of the additive codebooks: their embeddings (`embed`)."""
        return self.embed(queries)

    def prefix_codes(self, codes: np.ndarray, bits: int) -> np.ndarray:
        """First `bits` bits of full codes; for K < 256 a length that ends inside a byte keeps that byte
        with its unused high bits cleared, so equal prefixes give equal bytes."""
        levels = self._levels_for(bits)
        nbytes = self.bytes_per_item(bits)
        if codes.ndim != 2 or codes.shape[1] < nbytes:
            raise ValueError(f"drq: codes of shape {codes.shape} are shorter than {bits} bits")
        out = np.array(codes[:, :nbytes], dtype=np.uint8, order="C")  # a copy: the mask below writes
        used = levels * self.config.bits_per_level - 8 * (nbytes - 1)
        if used < 8:
            out[:, -1] &= np.uint8((1 << used) - 1)
        return out

    # -- fit --------------------------------------------------------------------------------------

    def train_on(self, device: str) -> bool:
        """Any torch device: the net and batches live there during `fit`; the fitted net is on the CPU."""
        self.train_device = device
        return True

    def fit(self, train: np.ndarray, labels: np.ndarray,
            val: tuple[np.ndarray, np.ndarray] | None = None) -> FitReport:
        """Staged training (embedding -> level 0 -> all levels) on `train` with its labels; `val` only
        for the reported per-length val mAP (val queries vs the rest of val). Cost: see DRQConfig."""
        cuda = [torch.device(self.train_device).index or 0] if self.train_device.startswith("cuda") else []
        with fit_threads(self.config.train_threads), torch.random.fork_rng(devices=cuda):
            return self._fit(train, labels, val)  # fork_rng: seeding here leaves the caller's RNG alone
    def _fit(self, train: np.ndarray, labels: np.ndarray,
             val: tuple[np.ndarray, np.ndarray] | None) -> FitReport:
        t0 = time.perf_counter()
        self.net, t_embed = train_net(train, labels, self.config, self.train_device)
        fit_s = time.perf_counter() - t0
        metrics = self.val_maps(*val) if val is not None else {}
        LOG.info("drq fit: %.1f s (embedding %.1f s), val %s", fit_s, t_embed, metrics)
        return FitReport(fit_s=fit_s, val_metrics=metrics)

    def val_maps(self, features: np.ndarray, labels: np.ndarray, n_queries: int = 1000) -> dict[str, float]:
        """Per-length mAP@all on a labelled split: its first `n_queries` rows against the rest."""
        labels = np.asarray(labels)
        nq = min(n_queries, len(features) // 2)
        q, d, ql, dl = features[:nq], features[nq:], labels[:nq], labels[nq:]
        codes = self.encode(d)
        out = {f"map@{b}": mean_average_precision(self.scores(q, codes, b), ql, dl)["map"] for b in self.lengths}
        zq, zd = self.embed(q), self.embed(d)
        out["map@float"] = mean_average_precision(zq @ zd.T, ql, dl)["map"]
        return out

    # -- encode / search ------------------------------------------------------------------------

    def _check_features(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        d_in = self._require_fit().mean.shape[0]
        if x.ndim != 2 or x.shape[1] != d_in:
            raise ValueError(f"drq: expected (n, {d_in}) float features, got shape {x.shape}")
        return x

    @torch.no_grad()
    def embed(self, x: np.ndarray) -> np.ndarray:
        """(n, D_in) features -> (n, dim) float32 unit embeddings, batched."""
        net = self._require_fit()
        x = self._check_features(x)
        out = np.empty((len(x), self.config.dim), dtype=np.float32)
        for i in range(0, len(x), ENCODE_BATCH):
            out[i: i + ENCODE_BATCH] = net.embed(torch.from_numpy(x[i: i + ENCODE_BATCH])).numpy()
        return out

    @torch.no_grad()
    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, D_in) -> (n, levels*log2(K)/8) uint8, deterministic, in batches of ENCODE_BATCH rows."""
        net = self._require_fit()
        x = self._check_features(x)
        b = np.empty((len(x), self.config.levels), dtype=np.int64)
        for i in range(0, len(x), ENCODE_BATCH):
            z = net.embed(torch.from_numpy(x[i: i + ENCODE_BATCH]))
            b[i: i + ENCODE_BATCH] = net.quantize(z, self.config.levels)[0].numpy()
        return pack_levels(b, self.config.bits_per_level)

    def decode_levels(self, codes: np.ndarray, bits: int | None = None) -> np.ndarray:
        """Codes (full or at least `bits` long) -> (n, bits/log2(K)) int64 level indices."""
        return unpack_levels(codes, self.config.bits_per_level, self._levels_for(bits))

    @torch.no_grad()
    def reconstruct(self, codes: np.ndarray, bits: int | None = None) -> np.ndarray:
        """Codes -> (n, dim) float32 z_hat = sum_m s_m C[b_m] over the first bits/log2(K) levels."""
        net = self._require_fit()
        b = self.decode_levels(codes, bits)
        out = np.empty((len(b), self.config.dim), dtype=np.float32)
        for i in range(0, len(b), ENCODE_BATCH):
            out[i: i + ENCODE_BATCH] = net.reconstruct(torch.from_numpy(b[i: i + ENCODE_BATCH])).numpy()
        return out

    @torch.no_grad()
    def lookup_tables(self, queries: np.ndarray) -> np.ndarray:
        """(nq, D_in) -> (nq, K) T[k] = <q_emb, C_k>: one table serves every level (shared codebook)."""
        net = self._require_shared()
        return (torch.from_numpy(self.embed(queries)) @ net.codebook.T).numpy()

    def lut_scores(self, queries: np.ndarray, codes: np.ndarray, bits: int | None = None) -> np.ndarray:
        """<q_emb, z_hat> (nq, n) by table lookups: T = lookup_tables(q) once per query (the codebook
        is shared), then sum_m s_m T[:, b_m]. Cost: nq*K*dim + nq*n*levels gathers."""
        return self._lut_ip(self.embed(queries), codes, bits)

    @torch.no_grad()
    def _lut_ip(self, qe: np.ndarray, codes: np.ndarray, bits: int | None) -> np.ndarray:
        net = self._require_shared()
        b = self.decode_levels(codes, bits)
        s = net.scales(b.shape[1]).numpy()
        tables = (torch.from_numpy(qe) @ net.codebook.T).numpy()
        out = np.empty((len(tables), len(b)), dtype=np.float32)
        cols = [np.ascontiguousarray(b[:, m], dtype=np.intp) for m in range(b.shape[1])]
        for i in range(0, len(tables), LUT_QUERY_BATCH):
            t = tables[i: i + LUT_QUERY_BATCH]
            acc = np.take(t, cols[0], axis=1)
            for m in range(1, len(cols)):
                acc += np.take(t * s[m], cols[m], axis=1)  # scale the small table, not the gathered block
            out[i: i + LUT_QUERY_BATCH] = acc
        return out

    def _recon_norms_and_ip(self, qe: np.ndarray, codes: np.ndarray, bits: int | None,
                            with_ip: bool) -> tuple[np.ndarray | None, np.ndarray]:
        """(<qe, z_hat> (nq, n) or None, ||z_hat||^2 (n,)), reconstructing RECON_BATCH items at a
        time: the inner products are one GEMM per chunk."""
        n = len(codes)
        out = np.empty((len(qe), n), dtype=np.float32) if with_ip else None
        norms = np.empty(n, dtype=np.float32)
        for i in range(0, n, RECON_BATCH):
            z = self.reconstruct(codes[i: i + RECON_BATCH], bits)
            if out is not None:
                np.matmul(qe, z.T, out=out[:, i: i + RECON_BATCH])
            norms[i: i + RECON_BATCH] = np.einsum("nd,nd->n", z, z)
        return out, norms

    def scores(self, queries: np.ndarray, codes: np.ndarray, bits: int | None = None) -> np.ndarray:
        """Asymmetric similarity (nq, n) float32 at `bits` (default full; codes may be full-length or
        already cut to `bits`), per `config.score`: ip <q, z_hat>; l2 -||q - z_hat||^2; cos
        <q, z_hat>/||z_hat||, where q is the embedded query (unit norm) and z_hat = sum_m s_m C[b_m].

        <q, z_hat> equals the ADC sum_m s_m T[b_m] (`lut_scores`); it is computed as one GEMM against
        the reconstructed items when dim <= 64 * levels, else by the tables (the crossover was
        measured: BENCHMARKS.md, "DRQ timings moved from docstrings").
        Cost: nq*n*dim flops (or nq*n*levels gathers) + n*levels*dim for the reconstructions;
        memory: the output + RECON_BATCH*dim floats.
        """
        levels = self._levels_for(bits)
        qe = self.embed(queries)
        score = self.config.score
        use_gemm = self.config.dim <= 64 * levels or self.config.codebooks != "shared"  # tables: shared C only
        if score == "l2":
            qe *= 2  # -||q - z||^2 = 2<q, z> - ||z||^2 - 1 for unit q: one GEMM, one subtraction
        if use_gemm or score != "ip":
            out, norms = self._recon_norms_and_ip(qe, codes, bits, with_ip=use_gemm)
        if not use_gemm:
            out = self._lut_ip(qe, codes, bits)
        if score == "l2":
            out -= (norms + 1.0)[None, :]
        elif score == "cos":
            out /= np.sqrt(norms).clip(1e-12)[None, :]
        return out

    # -- persistence ----------------------------------------------------------------------------

    def truncated(self, levels: int) -> "DRQCoder":
        """The same model keeping only its first `levels` levels (encodes the prefix of every code)."""
        if not 1 <= levels <= self.config.levels:
            raise ValueError(f"drq: levels must be in [1, {self.config.levels}], got {levels}")
        st = self.state()
        st["config"]["levels"] = levels
        st["level_scales"] = st["level_scales"][: levels - 1].clone()
        if self.config.codebooks == "per-level":
            st["codebook"] = st["codebook"][:levels].clone()
        return DRQCoder.from_state(st)

    def state(self) -> dict[str, Any]:
        net = self._require_fit()
        return {
            "method": self.method,
            "config": asdict(self.config),
            "d_in": int(net.mean.shape[0]),
            **{k: v.detach().clone() for k, v in net.state_dict().items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "DRQCoder":
        if state.get("method") != "drq":
            raise ValueError(f"drq: state is for method {state.get('method')!r}")
        coder = cls(DRQConfig(**state["config"]))
        net = make_net(int(state["d_in"]), coder.config)
        keys = set(net.state_dict())
        net.load_state_dict({k: state[k] for k in keys})
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        coder.net = net
        return coder
