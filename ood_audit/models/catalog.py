"""The model families by name, with what each is: the choices of ``--model`` and the
text ``--help`` lists, torch-free. :data:`~ood_audit.models.registry.MODELS` takes its
summaries from here and adds how to build each family; :func:`family_summaries` adds the
families installed packages register (:mod:`.plugins`), by name, without importing them.
"""

from .plugins import plugin_names

MODEL_FAMILIES: dict[str, str] = {
    "glow": "Glow with affine coupling (Kingma & Dhariwal 2018)",
    "glow-cv": "constant-volume Glow: additive coupling, log|det| independent of x",
    "vae": "conv VAE, discretized logistic decoder, scored by the IWAE bound "
           "(Kingma & Welling 2014; Burda et al. 2016)",
    "pixelcnn": "PixelCNN++: gated two-stream autoregressive model, discretized logistic "
                "mixture (Salimans et al. 2017)",
    "hvae": "hierarchical (ladder) VAE, 3+ latent layers, top-down inference, discretized "
            "logistic decoder; IWAE bound and the L>k bounds of llr-k (Sønderby et al. 2016; "
            "Havtorn et al. 2021)",
}


def family_summaries() -> dict[str, str]:
    """Every family ``train --model`` takes, built-in first: the built-in summaries, and a
    plugin's distribution (its own summary is in ``ood-audit models``, which imports it)."""
    plugins = {name: f"plugin from {dist} (ood-audit models)" for name, dist in plugin_names().items()
               if name not in MODEL_FAMILIES}
    return {**MODEL_FAMILIES, **plugins}
