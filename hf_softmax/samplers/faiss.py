"""``faiss``: Facebook AI Similarity Search indexes (``index: flat | ivf | hnsw``).

Knobs: ``index`` — ``flat`` (exact, brute force in BLAS), ``ivf`` (inverted lists over
``nlist`` k-means cells, each query scans the ``nprobe`` nearest cells; -1: nlist =
4·sqrt(N), capped so every cell gets >= 39 training rows; ``storage``: ``flat`` float32
rows, 4·D bytes each, or ``sq8`` 8-bit scalar-quantised rows, D bytes each, slightly lower
recall), ``hnsw`` (graph of degree ``m``,
build beam ``efConstruction``, query beam ``efSearch``); ``threads`` (build threads) and
``query_threads`` (threads sharing one batch's queries), -1 = all cores; ``kmeans_iters``
and ``train_per_list`` (rows per cell the IVF k-means sees; more: better cells, slower
build); ``device`` (``auto`` | ``cpu`` | ``cuda``, see below).
Metric: "ip" -> inner product; "cosine" -> inner product over L2-normalised rows and queries.

Cost: one ``search`` call per batch, multi-threaded in C++ with the GIL released. ``flat``
O(B·N·D) per step like ``exact``; ``ivf`` O(B·(nlist + nprobe·N/nlist)·D), build one k-means
plus one assignment of the N rows (O(N·nlist·D)); ``hnsw`` O(B·efSearch·m·D), build
O(N log N·m·D) (the slowest to build).
Every rebuild builds a new index object from a snapshot, so the serving one is never
mutated; the query effort goes in per-call ``SearchParameters``.

On CUDA (``device: auto`` with a CUDA device, or ``cuda``), chosen at the first build and
logged: faiss with GPU support (``faiss-gpu``, ``faiss.get_num_gpus() > 0``) puts a ``flat``
or ``ivf`` index on the current device (``hnsw`` has no GPU form and stays on the CPU);
faiss-cpu with W fitting in half the device's free memory uses an exact chunked top-k on
the device (``samplers.exact.exact_topk`` over a device copy of W, perfect recall); else
the CPU index.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hf_softmax.cores import threads_for
from hf_softmax.samplers.base import Sampler
from hf_softmax.samplers.exact import exact_topk

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw")
STORAGES = ("flat", "sq8")  # how an ivf index stores its rows
DEVICES = ("auto", "cpu", "cuda")
_EFFORT = {"flat": None, "ivf": "nprobe", "hnsw": "efSearch"}
_MIN_PER_LIST = 39  # faiss warns below 39 training rows per k-means cell
_DEVICE_SHARE = 0.5  # the exact device top-k may take this share of the free device memory
# faiss's switch from its own loop to BLAS (sgemm) for a batch's distances to a flat index's
# rows (``flat``, and an ``ivf`` index's coarse quantizer). faiss-cpu 1.15.1 ships it at
# 128000, which kept a step's batch of 256 on the loop: 256 queries against 4,000 IVF
# centroids (D = 256) took 39-45 ms there, 4 ms in BLAS (one thread); a 10^6-class ivf search
# at nprobe 1, 2 threads: 21 -> 6 ms. 20 is faiss's earlier default; process-wide (a faiss
# global), set when the sampler imports faiss.
BLAS_THRESHOLD = 20
# the kind's own knobs (``FaissSampler.__init__`` between ``seed`` and ``**selection``)
FAISS_KNOBS = ("index", "nlist", "nprobe", "storage", "m", "efConstruction", "efSearch",
               "kmeans_iters", "train_per_list", "threads", "query_threads", "device")  # fmt: skip


def import_faiss() -> Any:
    """The ``faiss`` module, its BLAS switch lowered to ``BLAS_THRESHOLD``, or an ImportError
    saying what to install."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "sampler 'faiss' needs the faiss package: pip install faiss-cpu==1.15.1 "
            "(CUDA machines: faiss-gpu, e.g. conda install -c pytorch faiss-gpu)"
        ) from e
    if faiss.cvar.distance_compute_blas_threshold > BLAS_THRESHOLD:
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    return faiss


def default_nlist(num_classes: int) -> int:
    """~4·sqrt(N) IVF cells, at most N / 39 (k-means needs rows in every cell), at least 1."""
    return max(1, min(round(4 * math.sqrt(num_classes)), num_classes // _MIN_PER_LIST))


class FaissSampler(Sampler):
    name = "faiss"
    dense = False
    needs_index = True
    knob_attributes = {**Sampler.knob_attributes, "index": "index_kind"}
    worker_knobs = {"device": "cpu"}  # a build worker (background=process) builds on the CPU

    def __init__(
        self,
        num_classes: int,
        num: int,
        metric: str = "ip",
        seed: int = 0,
        index: str = "ivf",
        nlist: int = -1,
        nprobe: int = 16,
        storage: str = "flat",
        m: int = 32,
        efConstruction: int = 64,  # faiss's own names
        efSearch: int = 64,
        kmeans_iters: int = 10,
        train_per_list: int = 64,
        threads: int = -1,
        query_threads: int = -1,
        device: str = "auto",
        **selection: Any,
    ) -> None:
        super().__init__(num_classes, num, metric, seed, **selection)
        if index not in INDEX_KINDS:
            raise ValueError(f"sampler 'faiss': index must be one of {INDEX_KINDS}, got {index!r}")
        if device not in DEVICES:
            raise ValueError(f"sampler 'faiss': device must be one of {DEVICES}, got {device!r}")
        if storage not in STORAGES:
            raise ValueError(f"sampler 'faiss': storage must be one of {STORAGES}, got {storage!r}")
        self.faiss = import_faiss()
        self.index_kind = index
        self.effort_knob = _EFFORT[index]
        self.nlist = int(nlist) if int(nlist) > 0 else default_nlist(self.num_classes)
        if self.nlist > self.num_classes:
            raise ValueError(
                f"sampler 'faiss': nlist = {self.nlist} exceeds num_classes = {self.num_classes}"
            )
        self.nprobe = int(nprobe)
        self.storage = storage
        self.m = int(m)
        self.efConstruction = int(efConstruction)
        self.efSearch = int(efSearch)
        self.kmeans_iters = int(kmeans_iters)
        self.train_per_list = int(train_per_list)
        self.threads = threads_for(threads)
        self.query_threads = threads_for(query_threads)
        self.device = device
        self.backend: str | None = None  # "faiss-cpu" | "faiss-gpu" | "torch-exact" (1st build)
        self._gpu_resources: Any = None

    # -- query effort (callbacks.index_rebuild.target_recall) --------------------
    def default_effort(self, k: int) -> int | None:
        if self.index_kind == "ivf":
            return min(self.configured_effort, self.nlist)
        if self.index_kind == "hnsw":
            return max(self.configured_effort, k)  # faiss's HNSW search needs efSearch >= k
        return None

    @property
    def effort_limit(self) -> int:
        # nprobe = nlist scans every cell: more changes nothing
        return self.nlist if self.index_kind == "ivf" else int(self.num_classes)

    # -- build -----------------------------------------------------------------------------
    def choose_backend(self, weight_bytes: int) -> str:
        """Where the index lives (once; logged with the reason)."""
        if self.backend is not None:
            return self.backend
        cuda = torch.cuda.is_available() and self.device in ("auto", "cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("sampler 'faiss': device=cuda but torch sees no CUDA device")
        why = "no CUDA device" if self.device == "auto" else "device=cpu"
        backend = "faiss-cpu"
        if cuda and self.faiss.get_num_gpus() > 0 and self.index_kind != "hnsw":
            backend, why = "faiss-gpu", f"faiss has GPU support; {self.index_kind} on the device"
        elif cuda:
            free, _ = torch.cuda.mem_get_info()
            if self.faiss.get_num_gpus() > 0:
                why = "hnsw has no faiss GPU form"
            elif weight_bytes <= _DEVICE_SHARE * free:
                backend = "torch-exact"
                why = (f"faiss-cpu has no GPU support and W ({weight_bytes / 2**30:.2f} GiB) fits "
                       f"in {_DEVICE_SHARE:.0%} of the device's free {free / 2**30:.1f} GiB: "
                       "exact chunked top-k on the device")  # fmt: skip
            else:
                why = (f"faiss-cpu has no GPU support and W ({weight_bytes / 2**30:.2f} GiB) does "
                       f"not fit in {_DEVICE_SHARE:.0%} of the device's free "
                       f"{free / 2**30:.1f} GiB")  # fmt: skip
        self.backend = backend
        log.info("sampler 'faiss': %s index on %s (%s)", self.index_kind, backend, why)
        return backend

    def build_index(self, weights: np.ndarray) -> Any:
        """(N, D) float32 snapshot -> a faiss index (ids 0..N-1) or a device tensor."""
        # faiss copies the rows on add; only cosine needs a (normalised) copy of its own
        cosine = self.metric == "cosine"
        w = (
            np.array(weights, np.float32, order="C")
            if cosine
            else np.ascontiguousarray(weights, np.float32)
        )
        n, d = w.shape
        if n != self.num_classes:
            raise ValueError(f"sampler 'faiss': weights have {n} rows, expected {self.num_classes}")
        backend = self.choose_backend(w.nbytes)
        if backend == "torch-exact":
            t = torch.from_numpy(w).to(torch.device("cuda", torch.cuda.current_device()))
            return F.normalize(t, dim=1) if self.metric == "cosine" else t
        faiss = self.faiss
        if cosine:
            faiss.normalize_L2(w)
        faiss.omp_set_num_threads(self.threads)  # per calling thread (an OpenMP ICV)
        ip = faiss.METRIC_INNER_PRODUCT
        if self.index_kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif self.index_kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, self.m, ip)
            index.hnsw.efConstruction = self.efConstruction
        else:
            quantizer = faiss.IndexFlatIP(d)
            if self.storage == "sq8":
                qt = faiss.ScalarQuantizer.QT_8bit
                index = faiss.IndexIVFScalarQuantizer(quantizer, d, self.nlist, qt, ip)
            else:
                index = faiss.IndexIVFFlat(quantizer, d, self.nlist, ip)
            index.cp.niter = self.kmeans_iters
            index.cp.seed = self.seed
            index.cp.max_points_per_centroid = self.train_per_list  # k-means subsamples W
        if backend == "faiss-gpu":
            if self._gpu_resources is None:
                self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, torch.cuda.current_device(), index)
        if not index.is_trained:
            index.train(w)
        index.add(w)
        return index

    # -- query -----------------------------------------------------------------------------
    def query(self, features: np.ndarray, k: int) -> np.ndarray:
        return self.query_index(self._index, features, k)  # read once: a swap cannot tear it

    def query_index(self, index: Any, features: np.ndarray, k: int) -> np.ndarray:
        """features (B, D) -> (B, k) int64 ids of the best rows of ``index``, -1 padded."""
        if index is None:
            raise RuntimeError("sampler 'faiss': query before the first build")
        kk = min(k, self.num_classes)
        if isinstance(index, torch.Tensor):  # torch-exact on the device
            ids = exact_topk(index, features, kk, self.metric, normalized=True)
        else:
            faiss = self.faiss
            q = np.array(features, dtype=np.float32, copy=True, order="C")
            if self.metric == "cosine":
                faiss.normalize_L2(q)
            faiss.omp_set_num_threads(self.query_threads)
            _, ids = index.search(q, kk, params=self._search_params(index, kk))
            ids = ids.astype(np.int64, copy=False)
        if kk < k:
            ids = np.concatenate([ids, np.full((ids.shape[0], k - kk), -1, np.int64)], axis=1)
        return ids

    def _search_params(self, index: Any, k: int) -> Any:
        """Per-call effort (the serving index is never mutated); GPU: set on the index."""
        faiss = self.faiss
        if self.index_kind == "ivf":
            nprobe = max(1, min(self.nprobe, self.nlist))
            if self.backend == "faiss-gpu":
                faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
                return None
            return faiss.SearchParametersIVF(nprobe=nprobe)
        if self.index_kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=max(self.efSearch, k))
        return None
