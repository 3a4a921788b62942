"""diffreg — diffusion models for deformable image registration.

The package behind the book *Diffusion Models for Deformable Image Registration*.
Conventions (see ``book/notation.md``): images are ``(B, C, *spatial)``, displacement fields
``(B, ndim, *spatial)`` in voxel units, channel ``i`` moves along spatial axis ``i``, warping pulls:
``warped(p) = moving(p + ddf(p))``.

``import diffreg`` is light: it imports neither matplotlib nor ipywidgets.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``diffreg.register_files`` (:func:`diffreg.apply.register_files`), imported on first use so that ``import
    diffreg`` stays light."""
    if name == "register_files":
        from diffreg.apply import register_files

        return register_files
    raise AttributeError(f"module 'diffreg' has no attribute {name!r}")
