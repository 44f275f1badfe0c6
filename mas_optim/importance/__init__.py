r"""compute_omega: MAS parameter importance (paper Eq. 2), exact and fast.

.. math::
    \Omega_{ij} = \frac{1}{N} \sum_{k=1}^{N} \left|
        \frac{\partial \lVert F(x_k; \theta) \rVert_2^2}{\partial \theta_{ij}} \right|

The absolute value sits *inside* the mean over samples, so the gradient of a whole batch (which
sums before the absolute value) is a different quantity. The original code took batch size 1 to
get it; here one batched forward and backward gives it exactly (:mod:`.per_sample`):

* a module with a rule (:mod:`.rules`: :mod:`.linear`, :mod:`.conv`, :mod:`.norm`,
  :mod:`.embedding`, :mod:`.rnn`, :mod:`.hf_conv1d`) forms its per-sample gradients from its
  input and output gradient, without a per-sample forward or backward;
* a weight tied between modules (an embedding reused as the output layer) gets the sum of
  those modules' per-sample vector-Jacobian products, and a module whose output every sample
  shares (position embeddings of a ``(1, T)`` index) gets its output expanded to the batch,
  which makes its output gradient per sample: in a second forward for a batch of a new
  signature, in the one forward for the next batches with it (:mod:`.per_sample`);
* any other parameter gets its per-sample gradients from ``torch.func`` (:mod:`.functional`):
  the vector-Jacobian product of the one module that holds it (e.g. ``nn.MultiheadAttention``),
  or of the whole network when no module can be proven to see one sample per row;
* which dimension holds the samples is proven for every module from the data flow, never
  assumed from shapes (once per batch signature within a call, :mod:`.per_sample`).

The model runs in eval mode (BatchNorm uses its running statistics, dropout is off), so a batch
is processed exactly as its samples would be one by one.
"""

from .engine import all_reduce_sums, omega_sums
from .omega import compute_omega

__all__ = ["all_reduce_sums", "compute_omega", "omega_sums"]
