"""Streaming, mergeable float64 moment accumulators: the statistical contract of Phase 1.

An accumulator holds ``(n, mean, M2, min, max)`` per channel, where ``M2`` is the centred Gram
matrix ``sum (x - mean)(x - mean)^T``. Batches are folded in with the pairwise update of
Chan, Golub & LeVeque (1979), which is also the exact merge of two partial states; a batch's own
``M2`` is one float64 matrix product, so Phase 1 runs at GEMM speed instead of the per-sample
Welford (1962) loop. States are plain tensor dicts: they can be checkpointed, sent between
processes (Dask workers, DDP ranks) and merged in any order to float64 rounding.

Because first and second moments push exactly through affine maps ``y = A x + b``
(``mean_y = A mean + b``, ``M2_y = A M2 A^T``), one pass over the raw data is enough to fit a
chain of statistical nodes linked by affine nodes (see :mod:`nodes.training.statistical_trainer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from nodes.training.stats_blocked import blocked_sums, gather_rows

_F64 = torch.float64
#: A batch's ``(sum y, y^T y, min x, max x)`` as float64 tensors (min/max None if not tracked).
TensorSums = tuple[Tensor, Tensor, Tensor | None, Tensor | None]



@dataclass(frozen=True)
class MomentState:
    """Sufficient statistics of a set of C-dimensional samples (all float64).

    Attributes:
        n: Number of samples, a 0-d float64 tensor (float so merges stay in one dtype).
        mean: Per-channel mean, shape (C,).
        m2: Centred Gram matrix ``sum (x - mean)(x - mean)^T``, shape (C, C).
        min: Per-channel minimum, shape (C,); ``+inf`` where unknown or empty.
        max: Per-channel maximum, shape (C,); ``-inf`` where unknown or empty.
    """

    n: Tensor
    mean: Tensor
    m2: Tensor
    min: Tensor
    max: Tensor

    @property
    def num_channels(self) -> int:
        """Number of channels C."""
        return int(self.mean.shape[0])

    @property
    def count(self) -> int:
        """Number of samples as a Python int."""
        return int(self.n.item())

    @property
    def has_minmax(self) -> bool:
        """Whether min/max are known (they are lost through channel-mixing maps)."""
        return bool(torch.isfinite(self.min).all() and torch.isfinite(self.max).all())

    @classmethod
    def empty(cls, num_channels: int, device: torch.device | str | None = None) -> MomentState:
        """The state of zero samples (the identity of :meth:`merge`)."""
        c = num_channels
        return cls(
            n=torch.zeros((), dtype=_F64, device=device),
            mean=torch.zeros(c, dtype=_F64, device=device),
            m2=torch.zeros(c, c, dtype=_F64, device=device),
            min=torch.full((c,), float("inf"), dtype=_F64, device=device),
            max=torch.full((c,), float("-inf"), dtype=_F64, device=device),
        )

    @classmethod
    def from_samples(cls, x: Tensor, *, chunk: int | None = None) -> MomentState:
        """Moments of the rows of ``x`` (N, C), computed in float64 chunks."""
        acc = MomentAccumulator(int(x.shape[-1]), device=x.device, chunk=chunk)
        acc.update(x)
        return acc.state

    def cov(self, ddof: int = 1) -> Tensor:
        """Covariance matrix ``M2 / (n - ddof)`` (C, C)."""
        denom = self.n - ddof
        if denom.item() <= 0:
            raise ValueError(f"covariance needs more than {ddof} samples, got {self.count}")
        return self.m2 / denom

    def var(self, ddof: int = 1) -> Tensor:
        """Per-channel variance (C,)."""
        return torch.diagonal(self.cov(ddof)).clone()

    def merge(self, other: MomentState) -> MomentState:
        """Exact combination of two states (Chan, Golub & LeVeque 1979)."""
        if other.num_channels != self.num_channels:
            raise ValueError(
                f"cannot merge moments of {self.num_channels} and {other.num_channels} channels"
            )
        other = other.to(self.mean.device)
        n_a, n_b = self.n, other.n
        n = n_a + n_b
        # Branch-free, so merging on a GPU never waits for a device-to-host copy: an empty side
        # gives w = 0 (keep self) or w = 1 (take other), exactly, since empty means are zeros.
        delta = other.mean - self.mean
        w = n_b / n.clamp_min(1.0)
        mean = self.mean + delta * w
        m2 = self.m2 + other.m2 + torch.outer(delta, delta) * (n_a * w)
        return MomentState(
            n=n,
            mean=mean,
            m2=m2,
            min=torch.minimum(self.min, other.min),
            max=torch.maximum(self.max, other.max),
        )

    def affine(
        self, a: Tensor, b: Tensor | None = None, *, keeps_minmax: bool = False
    ) -> MomentState:
        """Moments of ``y = A x + b`` given the moments of ``x``.

        Args:
            a: Map of shape (K, C), (C,) for a per-channel (diagonal) scale, or () for one scale.
            b: Offset of shape (K,) or (), or None.
            keeps_minmax: For a diagonal ``a`` with non-negative entries min/max map exactly;
                otherwise they become unknown.
        """
        a = a.to(device=self.mean.device, dtype=_F64)
        if a.ndim == 0:  # one scale for every channel
            a = a.expand(self.num_channels)
        bb = None if b is None else b.to(device=self.mean.device, dtype=_F64)
        if bb is not None and bb.ndim == 0:
            bb = bb.expand(a.shape[0])
        if a.ndim == 1:
            mean = self.mean * a
            m2 = self.m2 * torch.outer(a, a)
            if keeps_minmax and bool((a >= 0).all()):
                lo, hi = self.min * a, self.max * a
            else:
                lo = torch.full_like(mean, float("inf"))
                hi = torch.full_like(mean, float("-inf"))
        else:
            mean = a @ self.mean
            m2 = a @ self.m2 @ a.T
            lo = torch.full_like(mean, float("inf"))
            hi = torch.full_like(mean, float("-inf"))
        if bb is not None:
            mean = mean + bb
            lo, hi = lo + bb, hi + bb
        return MomentState(n=self.n, mean=mean, m2=(m2 + m2.T) * 0.5, min=lo, max=hi)

    def to(self, device: torch.device | str) -> MomentState:
        """The same state on another device."""
        return MomentState(*(t.to(device) for t in self._tensors()))

    def _tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return (self.n, self.mean, self.m2, self.min, self.max)

    def to_dict(self) -> dict[str, Tensor]:
        """A plain tensor dict (checkpointable, loadable with ``weights_only=True``)."""
        return {
            "n": self.n.detach().cpu(),
            "mean": self.mean.detach().cpu(),
            "m2": self.m2.detach().cpu(),
            "min": self.min.detach().cpu(),
            "max": self.max.detach().cpu(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Tensor]) -> MomentState:
        """Inverse of :meth:`to_dict`."""
        missing = {"n", "mean", "m2", "min", "max"} - set(d)
        if missing:
            raise KeyError(f"moment state lacks keys {sorted(missing)}")
        return cls(*(d[k].to(_F64) for k in ("n", "mean", "m2", "min", "max")))


_FUSED: ModuleType | None = None
_FUSED_TRIED = False


def _fused_backend() -> ModuleType | None:
    """The fused Triton kernel module (:mod:`nodes.training.stats_cuda`), or None without Triton."""
    global _FUSED, _FUSED_TRIED
    if not _FUSED_TRIED:
        _FUSED_TRIED = True
        # Only Triton's absence turns the kernel off: any other import error is raised (a wrong
        # module path, left by the regrouping of nodes/ in 4b988cd, silently turned it off).
        try:
            import triton  # noqa: F401
        except ImportError:
            _FUSED = None
        else:
            from nodes.training import stats_cuda

            _FUSED = stats_cuda
    return _FUSED


class MomentAccumulator:
    """Streaming accumulator of :class:`MomentState`.

    It follows the :class:`~nodes.accumulators.Accumulator` contract (``update / merge /
    compute / reset / state_dict``).

    Each ``update`` shifts the batch by a reference point near the mean (the running mean),
    converts it to float64 chunk by chunk, and sums its Gram matrix ``Y^T Y`` and column sums
    with one float64 matrix product per chunk; the centred ``M2`` follows as
    ``Y^T Y - n ybar ybar^T`` (no cancellation, since the shift sits near the mean), and the
    batch's state is merged with the Chan et al. formula. Per pixel that is the cost of
    ``X^T X`` plus a cheap copy.

    On CUDA, where Triton is installed, one fused kernel (:mod:`nodes.training.stats_cuda`) reads
    each sample once and sums the same float64 quantities (no scratch copy; ``chunk`` does not
    apply); elsewhere the torch path below runs.

    Args:
        num_channels: Number of channels C.
        device: Device of the state.
        chunk: Pixels per GEMM; bounds the float64 scratch buffer to ``chunk * C * 8`` bytes.
            Default: sized from the L2 cache on the CPU (see
            :func:`nodes.training.stats_blocked.block_rows`), 1048576 on CUDA (fewer launches).
        track_minmax: Also track per-channel min/max.
        fused: Use the fused Triton kernel for CUDA samples where it is available; False keeps
            the torch path (chunked float64 GEMMs).
        gather: On the CPU, hold batches smaller than one call's worth of work
            (:func:`nodes.training.stats_blocked.gather_rows`, e.g. one 256 x 256 frame) and
            sum them together once they make one, in one blocked pass over all of them (none is
            copied); reading the state sums what is held. Each call costs the worker threads
            a wake-up and the caller a merge, about 1 ms on a 2-vCPU Xeon. The caller must not
            write a batch after handing it to ``update`` (fresh batches from a loader are
            fine); the held batches stay alive until summed. Phase 1's passes turn it on for
            loaders known to hand out fresh batches.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        device: torch.device | str | None = None,
        chunk: int | None = None,
        track_minmax: bool = True,
        fused: bool = True,
        gather: bool = False,
    ) -> None:
        self.num_channels = num_channels
        self.chunk = chunk
        self.track_minmax = track_minmax
        self.fused = fused
        self.gather = gather
        # CPU batches held back to be summed together (gather only), and their pixel count.
        self._held: list[Tensor] = []
        self._held_rows = 0
        self._state = MomentState.empty(num_channels, device=device)
        self._buf: Tensor | None = None
        # (state, its sample count) as last set by update: spares a device read of n.
        self._count: tuple[MomentState, int] | None = (self._state, 0)

    @property
    def state(self) -> MomentState:
        """The accumulated state (sums the batches held back by ``gather`` first)."""
        self._sum_held()
        return self._state

    @state.setter
    def state(self, value: MomentState) -> None:
        self._sum_held()
        self._state = value

    def update(self, x: Tensor) -> None:
        """Fold samples ``x`` of shape (N, C) (any float dtype) into the state."""
        if x.ndim != 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"expected samples of shape (N, {self.num_channels}), got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            return
        if x.device.type == "cpu":  # summed now, or held for later with gather
            self._held.append(x.detach())
            self._held_rows += x.shape[0]
            if (not self.gather
                    or self._held_rows >= gather_rows(self.num_channels, x.element_size())):
                self._sum_held()
            return
        self._sum_held()
        if x.device != self._state.mean.device:
            self._state_to(x.device)
        known = self._known_count()
        shift = self._shift(x, known)
        n = x.shape[0]
        fused = _fused_backend() if x.is_cuda and self.fused else None
        if fused is not None and fused.supports(x):
            # One read of x; the batch's state is built and merged on the device (no host sync).
            self._state = MomentState(*fused.fold(self._state._tensors(), x.detach(), shift,
                                                  track_minmax=self.track_minmax))
            self._count = None if known is None else (self._state, known + n)
            return
        self._merge_sums(self._torch_sums(x.detach(), shift), n, shift)

    def _sum_held(self) -> None:
        """Sum the held CPU batches (several only with ``gather``) in one blocked pass, merge."""
        if not self._held:
            return
        held, n = self._held, self._held_rows
        self._held, self._held_rows = [], 0
        if self._state.mean.device.type != "cpu":
            self._state_to(torch.device("cpu"))
        shift = self._shift(held[0], self._known_count())
        self._merge_sums(self._cpu_sums(held, shift), n, shift)

    def _state_to(self, device: torch.device) -> None:
        """Move the state to ``device``, keeping the sample count the host knows."""
        known = self._known_count()
        self._state = self._state.to(device)
        self._count = None if known is None else (self._state, known)

    def _merge_sums(self, sums: TensorSums, n: int, shift: Tensor) -> None:
        """Merge ``n`` samples, given their sums of ``x - shift``, into the state."""
        ysum, gram, lo, hi = sums
        known = self._known_count()
        ybar = ysum / n
        m2 = gram - torch.outer(ybar, ybar) * n
        c = self.num_channels
        batch = MomentState(
            # torch.full, not torch.tensor: a host-to-device copy would wait for the GPU.
            n=torch.full((), float(n), dtype=_F64, device=shift.device),
            mean=shift + ybar,
            m2=(m2 + m2.T) * 0.5,
            min=lo if lo is not None else torch.full((c,), float("inf"), dtype=_F64,
                                                     device=shift.device),
            max=hi if hi is not None else torch.full((c,), float("-inf"), dtype=_F64,
                                                     device=shift.device),
        )
        self._state = self._state.merge(batch)
        self._count = None if known is None else (self._state, known + n)

    def _known_count(self) -> int | None:
        """Samples in the state, where the host knows them without reading the device.

        Known while the state is the empty start or the one the last update left; None after a
        merge, a load or an outside assignment.
        """
        if self._count is not None and self._count[0] is self.state:
            return self._count[1]
        return None

    def _shift(self, x: Tensor, known: int | None) -> Tensor:
        """Reference point of a batch: the running mean, or the batch head's mean at first.

        Subtracted before the sums so they carry no large offset; it is fixed for the batch, so
        the chunks add up exactly. Where the host does not know whether the state is empty, the
        choice is made on the device (no host sync).
        """
        if known is not None and known > 0:
            return self._state.mean
        head = x[: min(x.shape[0], 4096)].to(_F64).mean(dim=0)
        if known == 0:
            return head
        return torch.where(self._state.n > 0, self._state.mean, head)

    def _torch_sums(self, x: Tensor, shift: Tensor) -> TensorSums:
        """Column sums, Gram matrix and min/max of ``x - shift`` in float64 chunks (CUDA).

        Per chunk: one kernel shifts and converts into a reused contiguous float64 buffer, one
        GEMM accumulates the Gram matrix in place, and the column sums are read off the float32
        input with float64 accumulation (half the bytes of summing the float64 copy).
        """
        c = self.num_channels
        chunk = min(self.chunk or (1 << 20), x.shape[0])
        buf = self._buf
        if buf is None or buf.shape[0] < chunk or buf.device != x.device:
            buf = torch.empty(chunk, c, dtype=_F64, device=x.device)
            self._buf = buf
        gram = torch.zeros(c, c, dtype=_F64, device=x.device)
        raw = torch.zeros(c, dtype=_F64, device=x.device)
        lo = hi = None
        for start in range(0, x.shape[0], chunk):
            xc = x[start : start + chunk]
            y = torch.sub(xc, shift, out=buf[: xc.shape[0]])
            gram.addmm_(y.T, y)
            raw += xc.sum(dim=0, dtype=_F64)
            if self.track_minmax:
                clo, chi = torch.aminmax(xc, dim=0)
                lo = clo if lo is None else torch.minimum(lo, clo)
                hi = chi if hi is None else torch.maximum(hi, chi)
        ysum = raw - shift * x.shape[0]
        return (ysum, gram,
                None if lo is None else lo.to(_F64), None if hi is None else hi.to(_F64))

    def _cpu_sums(self, xs: list[Tensor], shift: Tensor) -> TensorSums:
        """Column sums, Gram matrix and min/max of ``x - shift`` over batches ``xs`` (CPU).

        One blocked pass over cache-sized pixel blocks, split over worker threads
        (:func:`nodes.training.stats_blocked.blocked_sums`); ``chunk``, where given, is the
        block size in pixels.
        """
        ysum, gram, lo, hi = blocked_sums(xs, shift, track_minmax=self.track_minmax,
                                          rows=self.chunk)
        return (torch.from_numpy(ysum), torch.from_numpy(gram),
                None if lo is None else torch.from_numpy(lo),
                None if hi is None else torch.from_numpy(hi))

    def merge(self, other: MomentAccumulator | MomentState) -> MomentAccumulator:
        """Merge another accumulator's (or a raw state's) samples into this one; returns self."""
        st = other.state if isinstance(other, MomentAccumulator) else other
        self.state = self.state.merge(st)
        return self

    def compute(self) -> MomentState:
        """The accumulated state (the accumulator stays usable)."""
        return self.state

    finalize = compute

    def reset(self) -> None:
        """Back to no samples (same channels and device); held batches are dropped."""
        self._held, self._held_rows = [], 0
        self.state = MomentState.empty(self.num_channels, device=self.state.mean.device)
        self._count = (self.state, 0)

    def state_dict(self) -> dict[str, Tensor]:
        """Checkpointable state."""
        return self.state.to_dict()

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        """Restore from :meth:`state_dict`."""
        self.state = MomentState.from_dict(d)


def merge_all(states: list[MomentState]) -> MomentState:
    """Merge a list of states pairwise (tree order keeps rounding error low)."""
    if not states:
        raise ValueError("merge_all needs at least one state")
    items = list(states)
    while len(items) > 1:
        items = [
            items[i].merge(items[i + 1]) if i + 1 < len(items) else items[i]
            for i in range(0, len(items), 2)
        ]
    return items[0]
