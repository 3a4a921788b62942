"""diffreg — diffusion models for deformable image registration.

The package behind the book *Diffusion Models for Deformable Image Registration*.
Conventions (see ``book/notation.md``): images are ``(B, C, *spatial)``, displacement fields
``(B, ndim, *spatial)`` in voxel units, channel ``i`` moves along spatial axis ``i``, warping pulls:
``warped(p) = moving(p + ddf(p))``.

``import diffreg`` is light: it imports neither matplotlib nor ipywidgets.
"""

__version__ = "0.1.0"
