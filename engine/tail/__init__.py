"""Full-attention probabilities: the attention mass of every slot, exact where the search
scored it and estimated beyond, with a certificate on what was not scored.

Matching Networks attend over the whole support set; the engine reads only what its
index scores. With many slots and a moderate temperature most of the mass lies outside
the top-k, so top-k probabilities are not those of the model that was trained. A full
answer (:func:`engine.tail.full.answer`) counts every slot the search scored exactly
(every slot of a Flat memory, every slot of the lists an IVF-Flat query probes, the
retrieved slots otherwise) and estimates the rest cell by cell (:mod:`engine.tail.cells`),
at a cost that grows with the cells and the classes that carry mass, not with
cells x classes.

The estimate of a cell's attention mass ``sum w_i exp(q.z_i / T)``:

- cosine memories: the slots are modelled as a von Mises-Fisher distribution on the unit
  sphere with mean direction ``S / |S|`` and a concentration ``kappa`` fitted to the mean
  resultant length ``R = |S| / W`` (Banerjee et al. 2005, "Clustering on the unit
  hypersphere using von Mises-Fisher distributions", eq. 4.4). The mass is then ``W``
  times the distribution's moment generating function at ``q / T``, computed in log space
  through the uniform (Debye) expansion of the Bessel function ``I_{d/2-1}``;
- inner-product memories: the first-order ``W exp(q.mu / T)``, ``mu = S / W``.

Each cell's estimate is capped by its certificate: its mass bound times ``exp(u / T)``,
``u`` the most a slot within the cell's reach of its pivot can score.
"""

from __future__ import annotations

from .cells import Cells, partition_size
from .vmf import class_tail_torch, kappa_from_resultant, log_vmf_mgf, log_vmf_mgf_torch

__all__ = ["Cells", "class_tail_torch", "kappa_from_resultant", "log_vmf_mgf",
           "log_vmf_mgf_torch", "partition_size"]
