"""ood-audit: audit deep generative models as out-of-distribution detectors.

Reproduces Nalisnick et al., "Do Deep Generative Models Know What They Don't Know?"
(ICLR 2019) on any model and data set.
"""

__version__ = "0.2.0"
