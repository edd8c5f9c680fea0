"""The attention mass top-k leaves out, estimated from per-partition summaries.

Matching Networks attend over the whole support set; the engine reads only the top-k
slots exactly. With many slots and a moderate temperature most of the mass lies outside
the top-k (at 1M slots and T = 0.05, 59-66% at the median on bench/tail.py's data), so
top-k probabilities are not those of the model that was trained. This module estimates,
per class, the mass of the slots left out, at a cost that depends on the number of
groups, not of slots, and bounds it (a certificate).

Slots are split into groups, one per (cell, class): a cell is an IVF list when the index
has them, else a cell of a k-means partition made here (:func:`partition_size` cells;
one, the whole memory, below 4,096 slots). A group keeps its slot count, its mass
``W = sum w_i``, the mass-weighted sum of its vectors ``S = sum w_i z_i``, a fixed
pivot and its reach (how far any slot it held lies from the pivot), kept up to date on
every write and rebuilt with the state.

The estimate of a group's attention mass ``sum w_i exp(q.z_i / T)``:

- cosine memories: the slots are modelled as a von Mises-Fisher distribution on the unit
  sphere with mean direction ``S / |S|`` and a concentration ``kappa`` fitted to the mean
  resultant length ``R = |S| / W`` (Banerjee et al. 2005, "Clustering on the unit
  hypersphere using von Mises-Fisher distributions", eq. 4.4). The mass is then ``W``
  times the distribution's moment generating function at ``q / T``,
  ``C_d(kappa) / C_d(|kappa mu + q / T|)``, computed in log space through the uniform
  (Debye) expansion of the Bessel function ``I_{d/2-1}``;
- inner-product memories: the first-order ``W exp(q.mu / T)``, ``mu = S / W``.

Both are exact when a group's slots are identical (``R = 1``). For a query, the slots
it retrieved are taken out of their groups first (their mass from ``W``, their scores
from ``q.S``), and each group's estimate is capped at ``W' exp(s_k / T)``: with an exact
index no slot left out scores above the k-th.

The certificate (:meth:`Summaries.estimate` with ``capped``) bounds each group by its
remaining mass times ``exp(u / T)``, ``u`` the most a slot within the reach of the pivot
can score, capped at ``s_k`` where the search saw the whole group.
"""

from __future__ import annotations

from .summaries import CELL_SHIFT, Summaries, partition_size
from .vmf import class_tail_torch, kappa_from_resultant, log_vmf_mgf, log_vmf_mgf_torch

__all__ = ["CELL_SHIFT", "Summaries", "class_tail_torch", "kappa_from_resultant", "log_vmf_mgf",
           "log_vmf_mgf_torch", "partition_size"]
