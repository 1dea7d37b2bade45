"""The input ranges an imported module may take, by name: what ``--input-range`` accepts.

Torch-free, so the CLI checks the option before torch loads. Every model of ood-audit
is a density over the dequantized image x = (k + u) / 256 in [0, 1)^D
(:mod:`ood_audit.data.preprocess`); a module that takes y = a x + b instead has
p(x) = p(y) |a|^D, so the wrapper (:mod:`.imported`) writes ``D log|a|`` as a term of its
own and bits/dim stay comparable with every other model.
"""

from __future__ import annotations

#: ``--input-range`` name -> (a, b) of y = a x + b, x in [0, 1).
INPUT_RANGES: dict[str, tuple[float, float]] = {
    "0,1": (1.0, 0.0),  # x itself
    "-0.5,0.5": (1.0, -0.5),  # the Glow ports' x - 0.5
    "-1,1": (2.0, -1.0),  # 2x - 1
    "0,255": (256.0, 0.0),  # pixel units: y = 256 x = k + u in [0, 256)
}

DEFAULT_INPUT_RANGE = "0,1"

#: What ``--discrete`` declares: ``log_prob`` takes uint8 pixels k and returns log P(k).
DISCRETE_HELP = ("log_prob takes uint8 pixels k in 0..255 (k = floor(256 x)) and returns "
                 "log P(k); D log 256 is added as a term of its own, so log p(x) is the "
                 "density of the dequantized image, as for ood-audit's own discrete models")
