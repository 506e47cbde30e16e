"""Inspection: hooks that look inside a generation, attention maps, latent previews, figures and widgets."""
