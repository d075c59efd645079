"""Pipelines that compose SPHINX with Segment Anything and Stable Diffusion.

Components are built by the caller (nothing here downloads or loads weights by itself, except
:func:`load_sam` from a local checkpoint) and passed in, as in diffusers::

    from sphinx_tools.pipelines import SphinxSamPipeline, load_sam
    out = SphinxSamPipeline(sphinx, load_sam("sam_vit_h.pth"))(image, "detection")

Names are imported on first use, so ``segment_anything`` and ``diffusers`` load only when a
pipeline that needs them is used.
"""

from importlib import import_module

_EXPORTS = {
    "segment": (
        "MASK_SCORE_FIELD",
        "PROMPT_BOX_FIELD",
        "SOURCE_INDEX_FIELD",
        "SphinxSam",
        "SphinxSamOutput",
        "SphinxSamPipeline",
        "keypoint_prompts",
        "load_sam",
        "segment_detections",
    ),
    "diffusion": (
        "DEFAULT_NEGATIVE_PROMPT",
        "DEFAULT_STYLE",
        "SphinxDiffusionOutput",
        "SphinxStableDiffusionPipeline",
        "build_sd_prompt",
        "describe_image",
        "generate_images",
        "split_clauses",
    ),
    "inpaint": (
        "SphinxInpaintOutput",
        "SphinxSamInpaintPipeline",
        "dilate_mask",
        "feather_mask",
        "inpaint_with_mask",
    ),
    "synthetic": (
        "SphinxLabeler",
        "SphinxSyntheticDataPipeline",
        "SyntheticDataOutput",
        "build_coco",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)


def __dir__():
    return __all__
